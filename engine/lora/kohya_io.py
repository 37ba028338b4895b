"""Read and write LoRA files.

Writing: kohya's format (see `network.py` for the keys), atomically (temp file + rename), with the
`ss_*`/`modelspec.*` header and kohya's two hashes: `sshs_model_hash`, the sha256 of the tensor bytes
after the header (Civitai's AutoV3, what A1111 shows in "Lora hashes"), and `sshs_legacy_hash`.

Reading, to continue training: kohya files (diffusers- or LDM-derived UNet names), diffusers/PEFT
files (`unet.<name>.lora_A.weight`) and ComfyUI's native trainer files
(`diffusion_model.<ldm name>.lora_down.weight`, 2-D conv weights). Keys are matched through the
aliases `LoRANetwork` records for every module, so every naming lands on the same module.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..errors import UserError
from .network import LoRANetwork

# file suffix -> the suffix in our network's state dict
_DOWN, _UP = "lora_down.weight", "lora_up.weight"
_SUFFIXES = (
    (".lora_down.weight", _DOWN), (".lora_up.weight", _UP), (".alpha", "alpha"),
    (".lora_A.weight", _DOWN), (".lora_B.weight", _UP),
    (".lora.down.weight", _DOWN), (".lora.up.weight", _UP),
    (".lora_linear_layer.down.weight", _DOWN), (".lora_linear_layer.up.weight", _UP),
    # LyCORIS' variants (engine/lora/variants/), named as ComfyUI, A1111 and LyCORIS read them
    *((f".{name}", name) for name in ("dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
                                      "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")),
)

def tensor_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: hashes of a serialisation that
    keeps only the immutable `ss_*` metadata, so later edits of other header fields do not change it."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def _file_mode() -> int:
    mask = os.umask(0)  # read once at import (single-threaded then): os.umask can only be read by setting it
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder and rename it over `path` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; a LoRA must be readable like any other file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya-format LoRA file with its metadata and hashes; returns the path."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    model_hash, legacy_hash = tensor_hashes(tensors, metadata)
    header = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    atomic_write_bytes(path, save(tensors, header))
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA file, with a clear error for anything else."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"'{path.name}' is not a .safetensors file; LoRA files to continue from must be "
                        f".safetensors (kohya, diffusers/PEFT or ComfyUI format).")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read LoRA file '{path}': {exc}. The file may be incomplete; "
                        f"download or save it again.") from None
    return tensors, metadata


def _split(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def to_network_keys(network: LoRANetwork, tensors: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a file's tensors to `network`'s kohya keys; returns (renamed tensors, ignored keys).

    ComfyUI's 2-D conv weights are reshaped to kohya's 4-D shapes; a missing alpha means alpha = rank
    (diffusers/PEFT files fold the scale into the weights that way).
    """
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in tensors.items():
        split = _split(key)
        target = network.aliases.get(split[0]) if split else None
        if target is None:
            ignored.append(key)
            continue
        part = split[1]
        if part == "alpha":
            out[f"{target}.alpha"] = tensor
            continue
        want = network.loras[target].state_dict().get(part)
        if want is not None and tensor.shape != want.shape and tensor.numel() == want.numel() and tensor.dim() == 2:
            tensor = tensor.reshape(want.shape)  # ComfyUI-native conv LoRA: [r, in*k*k] / [out, r]
        out[f"{target}.{part}"] = tensor
    for key in network.loras:
        down = out.get(f"{key}.{_DOWN}")
        if down is not None and f"{key}.alpha" not in out:
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out, ignored


def file_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rank of every module in a file, keyed by the module's prefix in the file."""
    ranks = {}
    for key, tensor in tensors.items():
        split = _split(key)
        if split and split[1] in (_DOWN, "hada_w1_b"):
            ranks[split[0]] = int(tensor.shape[0])
    return ranks


def describe_file(path: str | Path) -> str:
    """One line for logs: module count, ranks and the base model it was trained on."""
    tensors, metadata = read_lora(path)
    ranks = sorted(set(file_ranks(tensors).values()))
    base = metadata.get("ss_base_model_version", "unknown base")
    return f"{Path(path).name}: {len(file_ranks(tensors))} modules, rank {ranks}, {base}"
