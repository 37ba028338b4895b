"""Loss masks: which pixels of an image the loss counts (kohya's masked_loss / alpha_mask).

A mask is a grey image where white (1) trains and black (0) is ignored: `<image>_mask.png` beside the
image (any image extension), or a file of the image's name in `conditioning_data_dir` (kohya's mask
folder; ComfyUI's Load Dataset writes its MASK input there, `save_masks`), or, with `alpha_mask`, the
image's own alpha channel (kohya's convention; opaque trains). An image without one trains everywhere. The mask goes through the image's own resize,
crop and flip, is kept in memory per image and crop (a cached latent keeps its mask), and is
area-downsampled to the latent's size, where it multiplies the per-pixel loss as kohya's
`apply_masked_loss` does (the loss is then averaged over all pixels, masked ones counting as 0).
A mask file is never a training image itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import DatasetError
from .buckets import Placement
from .images import IMAGE_EXTENSIONS

MASK_SUFFIX = "_mask"
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def is_mask_file(path: Path, siblings: set[str]) -> bool:
    """`photo_mask.png` when `photo.<image extension>` is in the same folder (`siblings`: its file names)."""
    stem = path.stem
    if not stem.endswith(MASK_SUFFIX) or len(stem) == len(MASK_SUFFIX):
        return False
    image = stem[: -len(MASK_SUFFIX)]
    return any(image + ext in siblings or image + ext.upper() in siblings for ext in IMAGE_EXTENSIONS)


def mask_file(image: Path, folder: str | Path = "") -> Path | None:
    """`<image>_mask.<ext>` beside the image, else `<folder>/<image stem>.<ext>` (or `_mask`) when given."""
    places = [(image.parent, f"{image.stem}{MASK_SUFFIX}")]
    if folder:
        places += [(Path(folder), image.stem), (Path(folder), f"{image.stem}{MASK_SUFFIX}")]
    for where, stem in places:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                candidate = where / f"{stem}{e}"
                if candidate.is_file():
                    return candidate
    return None


def _read(path: Path, alpha: bool) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if not alpha:
                return img.convert("L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                return img.convert("RGBA").getchannel("A")
            return None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"the mask '{path}' cannot be read ({exc}). Re-export it or remove it.") from None


def load_mask(image: Path, use_alpha: bool, folder: str | Path = "") -> Image.Image | None:
    """The image's mask as an 8-bit grey image, or None (it trains everywhere)."""
    found = mask_file(image, folder)
    if found is not None:
        return _read(found, alpha=False)
    return _read(image, alpha=True) if use_alpha else None


def place_mask(mask: Image.Image | None, place: Placement, crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """[1, h, w] float in [0, 1] over the bucket, as the image's pixels are resized, cropped and flipped."""
    w, h = place.bucket
    if mask is None:
        return torch.ones(1, h, w)
    if mask.size != place.resized:
        mask = mask.resize(place.resized, _BILINEAR)
    left, top = crop
    arr = np.asarray(mask.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    out = torch.from_numpy(arr)[None]
    return torch.flip(out, dims=[2]) if flip else out


def to_latent_size(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] pixel masks -> [B, 1, h, w] at the latents' size (area average, as kohya)."""
    return F.interpolate(masks, size=size, mode="area")


class MaskSource:
    """Masks of one dataset, each read once per (image, crop, flip) and kept in memory."""

    def __init__(self, use_alpha: bool, folder: str | Path = ""):
        self.use_alpha, self.folder = use_alpha, folder
        self._cache: dict[tuple, torch.Tensor] = {}
        self.found = 0  # images that have a mask

    def get(self, record: int, path: Path, place: Placement, crop: tuple[int, int], flip: bool,
            keep: bool = True) -> torch.Tensor:
        key = (record, crop, flip)
        if key in self._cache:
            return self._cache[key]
        mask = load_mask(path, self.use_alpha, self.folder)
        placed = place_mask(mask, place, crop, flip)
        if keep:  # random crops are not kept (every step has its own)
            self._cache[key] = placed
        return placed

    def count(self, paths: list[Path]) -> int:
        """How many of `paths` have a mask (for the warning when masked_loss finds none)."""
        self.found = sum(1 for p in paths if mask_file(p, self.folder) is not None or (self.use_alpha and _has_alpha(p)))
        return self.found


def _has_alpha(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    except (OSError, ValueError, SyntaxError):
        return False


def save_masks(masks: torch.Tensor, images: list[Path], folder: Path) -> Path:
    """Write a host's masks ([N, H, W] or [H, W] in [0, 1]: one per image in `images`' order, or one for
    all) as `<folder>/<image stem>.png`, the folder `conditioning_data_dir` then points at."""
    masks = masks.detach().float().cpu()
    if masks.dim() == 2:
        masks = masks[None]
    if masks.shape[0] not in (1, len(images)):
        raise DatasetError(f"the MASK input holds {masks.shape[0]} masks but the dataset has {len(images)} images: "
                           f"give one mask per image (in file-name order) or one mask for all.")
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        arr = (masks[i if masks.shape[0] > 1 else 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr, "L").save(folder / f"{image.stem}.png")
    return folder
