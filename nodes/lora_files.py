"""Writing a trained LoRA into ComfyUI's `models/loras`: safe names, no silent overwrite, atomic files.

A name may carry subfolders (`styles/ink`) but must stay inside the loras folder: `..`, absolute
paths and drive letters are refused with a message that says what to type instead. An existing file
is never replaced unless asked: the next free `name_2`, `name_3`... is used, because loaders cache
files by name (ComfyUI's LoraLoader keeps the last file it read) and a replaced file would silently
keep serving old weights. The `.safetensors` and its `.preview.png` are written atomically.
"""

from __future__ import annotations

import io
import re
from pathlib import Path, PurePosixPath

from ..engine.errors import UserError
from ..engine.lora.kohya_io import atomic_write_bytes, save_lora
from .values import LoRAWeights

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
EXAMPLE = "a plain name like 'my_style' or a subfolder like 'styles/my_style'"


def check_name(name: str) -> PurePosixPath:
    """The name as a relative path inside the loras folder, or a UserError saying what is wrong."""
    text = str(name or "").strip()
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    if not text:
        raise UserError(f"the LoRA name is empty; use {EXAMPLE}.")
    if re.match(r"^[a-zA-Z]:", text) or text.startswith(("/", "\\", "~")):
        raise UserError(f"the LoRA name '{name}' is an absolute path; files are always written into "
                        f"ComfyUI's models/loras folder, so use {EXAMPLE}.")
    path = PurePosixPath(text.replace("\\", "/"))
    if any(part in ("..", ".") for part in path.parts):
        raise UserError(f"the LoRA name '{name}' contains '..' or '.', which could leave models/loras; "
                        f"use {EXAMPLE}.")
    if _BAD_CHARS.search(text) or any(p != p.strip() or p.endswith(".") for p in path.parts):
        raise UserError(f"the LoRA name '{name}' has characters that are not allowed in file names "
                        f"(< > : \" | ? * or a part ending in a space or dot); use {EXAMPLE}.")
    return path


def target_path(root: Path, name: str, overwrite: bool = False) -> Path:
    """Where `name` goes under `root`: `<name>.safetensors`, or the next free numbered name."""
    rel = check_name(name)
    root = Path(root)
    base = root.joinpath(*rel.parts)
    candidate = base.with_name(base.name + ".safetensors")
    if overwrite or not candidate.exists():
        return candidate
    n = 2
    while True:
        numbered = base.with_name(f"{base.name}_{n}.safetensors")
        if not numbered.exists():
            return numbered
        n += 1


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
