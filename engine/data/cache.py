"""Caches of encoder outputs: VAE latents (memory or disk) and text-encoder conditioning (memory).

Encoding is the expensive, repeated part of a small-dataset run: with 30 images x 10 repeats x 10
epochs the VAE would see each image 100 times. A disk entry is named by a hash of everything that
changes the latent — the image file's *content*, the model key, the bucket, the resize and the crop
window — so editing an image or switching checkpoints re-encodes it, while renaming or moving the
folder does not. Files are written atomically (temp file + rename) so an interrupted run never leaves
a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..model import Conditioning

logger = logging.getLogger(__name__)
CACHE_VERSION = "1"


def file_digest(path: str | Path) -> str:
    """BLAKE2b of the file's bytes (hex, 32 chars)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CachedLatent:
    latent: torch.Tensor  # [C, h, w], float32, CPU
    flipped: torch.Tensor | None = None  # the latent of the mirrored image (with flip_aug)


def weights_digest(module: torch.nn.Module) -> str:
    """A short fingerprint of a module's weights (dtype, shapes and the first values of every tensor):
    what the disk latent cache keys on when no checkpoint file names the model, so two VAEs never
    share latents and the same VAE finds them again in a later session. Cheap: a few KiB per tensor."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            head = tensor.detach().reshape(-1)[:64].float().cpu()
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


class LatentStore:
    """Latents by key, in RAM (`memory`) or as one safetensors file per key in `folder` (`disk`)."""

    def __init__(self, mode: str, folder: Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(mode)
        self.mode = mode
        self.folder = folder
        self._memory: dict[str, CachedLatent] = {}

    @staticmethod
    def make_key(content_digest: str, model_key: str, bucket, resized, crop) -> str:
        text = f"v{CACHE_VERSION}|{content_digest}|{model_key}|{tuple(bucket)}|{tuple(resized)}|{tuple(crop)}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> CachedLatent | None:
        if self.mode == "memory":
            return self._memory.get(key)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            logger.warning("latent cache file %s is unreadable (%s); it will be re-encoded", path, exc)
            return None
        if "latent" not in tensors:
            return None
        return CachedLatent(tensors["latent"], tensors.get("latent_flipped"))

    def has(self, key: str, need_flipped: bool) -> bool:
        entry = self.get(key)
        return entry is not None and (entry.flipped is not None or not need_flipped)

    def put(self, key: str, entry: CachedLatent, *, source: str = "") -> None:
        entry = CachedLatent(entry.latent.detach().float().cpu().contiguous(),
                             None if entry.flipped is None else entry.flipped.detach().float().cpu().contiguous())
        if self.mode == "memory":
            self._memory[key] = entry
            return
        tensors = {"latent": entry.latent}
        if entry.flipped is not None:
            tensors["latent_flipped"] = entry.flipped
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"source": source, "version": CACHE_VERSION})
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class TextCache:
    """Conditioning per caption string, kept on the CPU and stacked per batch on demand."""

    def __init__(self):
        self._rows: dict[str, Conditioning] = {}

    def __contains__(self, caption: str) -> bool:
        return caption in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def put_batch(self, captions: list[str], cond: Conditioning) -> None:
        for i, caption in enumerate(captions):
            self._rows[caption] = {k: v[i:i + 1].detach().cpu().clone() for k, v in cond.items()}

    def batch(self, captions: list[str], device: torch.device) -> Conditioning | None:
        if not all(c in self._rows for c in captions):
            return None
        keys = self._rows[captions[0]].keys()
        return {k: torch.cat([self._rows[c][k] for c in captions]).to(device) for k in keys}
