"""Writing a trained LoRA into ComfyUI's `models/loras`: safe names, no silent overwrite, atomic files.

The naming rules (inside the folder, `name_2` instead of replacing a file) are the engine's
(engine/lora/output_names.py), shared with the command line. The `.safetensors` and its
`.preview.png` are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..engine.lora.kohya_io import atomic_write_bytes, save_lora
from ..engine.lora.output_names import check_name, target_path
from .values import LoRAWeights

__all__ = ["check_name", "prompt_tag", "target_path", "write_lora"]


def prompt_tag(path: Path, strength: float = 0.8) -> str:
    """A1111/Forge's prompt syntax for the file (by its stem, which is also its ss_output_name)."""
    return f"<lora:{path.stem}:{strength:g}>"


def write_lora(root: Path, name: str, lora: LoRAWeights, *, overwrite: bool = False, preview=None
               ) -> tuple[Path, str]:
    """Write `lora` (kohya tensors + metadata) and its preview; returns (file, name relative to root)."""
    path = target_path(root, name, overwrite)
    stem = path.stem
    metadata = {**lora.metadata, "ss_output_name": stem, "modelspec.title": stem}
    save_lora(path, lora.tensors, metadata)
    image = preview if preview is not None else lora.preview
    if image is not None:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        atomic_write_bytes(path.with_name(stem + ".preview.png"), buf.getvalue())
    return path, path.relative_to(Path(root)).as_posix()
