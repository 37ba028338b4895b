"""Reading checkpoint files safely: shapes without loading, tensors without executing pickles.

A user's "checkpoint" is often not what its name says: a download that stopped half-way, an HTML
login page saved as `.safetensors`, a Git LFS pointer, or an old `.ckpt` whose pickle holds Python
objects. Each gets a message that says what the file is and what to do, before any big read.
The sha256 (`ss_new_sd_model_hash`, Civitai's AutoV2) is computed only on request: hashing a 7 GB
SDXL file takes most of a minute on a hard disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import struct
from pathlib import Path

from ..errors import ModelError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 200 * 1024 * 1024


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _sniff(path: Path) -> None:
    """Recognise the common non-model files a failed download leaves behind."""
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        raise ModelError(f"'{path.name}' is a web page, not a model: the download failed (the site may "
                         f"have asked you to log in or accept a licence). Download the file again.")
    if text.startswith(b"version https://git-lfs"):
        raise ModelError(f"'{path.name}' is a Git LFS pointer, not the model itself. Run `git lfs pull` "
                         f"in its repository or download the file directly.")
    if text.startswith(b"{") and b'"_class_name"' in head:
        raise ModelError(f"'{path.name}' is a JSON config. Pass the diffusers folder that contains "
                         f"model_index.json, or a .safetensors checkpoint.")


def safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) from a .safetensors header; refuses damaged or truncated files."""
    path = Path(path)
    size = path.stat().st_size
    if size < 16:
        raise ModelError(f"'{path.name}' is only {size} bytes: it is empty or the download stopped at "
                         f"once. Download it again.")
    _sniff(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise ModelError(f"'{path.name}' is not a readable .safetensors file (its header is damaged, "
                             f"or it is another format renamed to .safetensors). Download it again; if it "
                             f"is a .ckpt, give it the .ckpt extension.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"'{path.name}' has a damaged safetensors header. Download it again.") from None
    if not isinstance(header, dict):
        raise ModelError(f"'{path.name}' has a damaged safetensors header. Download it again.")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelError(f"'{path.name}' has a damaged safetensors header. Download it again.") from None
    if 8 + n + end > size:
        raise ModelError(f"'{path.name}' is truncated: its header describes {_gb(8 + n + end)} but the file "
                         f"has {_gb(size)}. The download or copy stopped early (check free disk space); "
                         f"download it again.")
    return header, metadata


def read_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a .safetensors header without reading tensors; None for pickles
    (their keys are only known after loading)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header, _ = safetensors_header(path)
        return {k: tuple(v.get("shape", ())) for k, v in header.items()}
    return None


def _torch_load(path: Path):
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) .ckpt files cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = f" such as {found.group(1)}" if found else ""
        raise ModelError(
            f"'{path.name}' is a pickle that holds Python objects besides tensors{culprit}; "
            f"it is refused because loading it could run arbitrary code. Use the .safetensors version of "
            f"this model, or convert this file once with a tool you trust (for example ComfyUI's "
            f"CheckpointSave or A1111's checkpoint merger saving as safetensors).") from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise ModelError(f"'{path.name}' cannot be read as a PyTorch checkpoint ({first}). "
                         f"It is probably truncated or damaged: download it again, preferably as "
                         f".safetensors.") from None


def read_state_dict(path: Path) -> dict:
    """All tensors of a checkpoint file, on the CPU. Pickles load with `weights_only=True`."""
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        safetensors_header(path)  # clear errors before safetensors' own
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError has no stable import path across versions
            raise ModelError(f"'{path.name}' cannot be read ({exc}). Download it again.") from None
    if suffix not in PICKLE_SUFFIXES:
        hint = " GGUF files are quantised for inference only; use the .safetensors model." if suffix == ".gguf" else ""
        raise ModelError(f"'{path.name}': unsupported file type '{suffix}'. Use a .safetensors or .ckpt "
                         f"checkpoint, or a diffusers folder.{hint}")
    _sniff(path)
    obj = _torch_load(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and len(obj) < 16:
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ModelError(f"'{path.name}' holds a {type(obj).__name__}, not a checkpoint state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 of the whole file (Civitai AutoV2, kohya's `ss_new_sd_model_hash`), memoised per
    (path, size, mtime) so a second run in the same process does not read the file again."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASHES[key] = h.hexdigest()
        logger.info("sha256 of %s: %s", path.name, _HASHES[key])
    return _HASHES[key]
