"""Finding images in a folder and opening them safely.

Everything that reads a user's pictures goes through here (training, the captioners, `engine check`),
so every path handles the same surprises the same way: EXIF-rotated phone photos, transparent PNGs
(composited on white, as the sampler will never see alpha), 16-bit PNGs, macOS `._` resource files,
corrupt or truncated downloads, and thumbnails too small to learn from.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageFile:
    """An image that opened cleanly; width/height are as displayed (EXIF orientation applied). `mode`,
    `frames`, `sixteen_bit` and `transparent` say what converting it to 8-bit RGB does (the dataset scan
    names those images)."""

    path: Path
    width: int
    height: int
    mode: str = "RGB"
    frames: int = 1  # > 1: animated (WebP, APNG): the first frame is trained on
    sixteen_bit: bool = False
    transparent: bool = False  # has pixels that are not fully opaque (put on white)


def is_image_name(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_image_paths(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden and `._` files left out)."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_name(p)), key=lambda p: p.name)


def describe_contents(folder: str | Path) -> str:
    """'7 files (.psd x4, .txt x3) and 2 subfolders' — what a folder holds, for error messages."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file()]
    dirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not files and not dirs:
        return "nothing (the folder is empty)"
    kinds = Counter(p.suffix.lower() or "(no extension)" for p in files)
    parts = []
    if files:
        parts.append(f"{len(files)} file{'s' * (len(files) != 1)} ("
                     + ", ".join(f"{ext} x{n}" for ext, n in kinds.most_common(6)) + ")")
    if dirs:
        parts.append(f"{len(dirs)} subfolder{'s' * (len(dirs) != 1)}")
    return " and ".join(parts)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        raise DatasetError(f"'{path}' is too large to open safely; downscale it below 80 megapixels.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"'{path}' is not a readable image ({exc}). Re-export it or remove it.") from None


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without transposing the pixels."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF blocks are common and harmless
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in _ROTATED else (w, h)


def probe_image(path: str | Path) -> ImageFile:
    """Open and fully decode `path` once (so truncated files are caught now, not mid-training).

    JPEGs are decoded at reduced scale (`draft`), which still reads every byte but costs far less.
    Raises DatasetError with the reason.
    """
    path = Path(path)
    with _open(path) as img:
        size = displayed_size(img)
        mode, frames = img.mode, int(getattr(img, "n_frames", 1) or 1)
        sixteen = mode in _SIXTEEN_BIT or any(";16" in str(tile[-1]) for tile in (img.tile or []))
        try:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            transparent = _has_transparency(img)
        except Image.DecompressionBombError:
            raise DatasetError(f"'{path}' is too large to open safely; downscale it below 80 megapixels.") \
                from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"'{path}' is damaged ({exc}). Re-export it or remove it.") from None
    return ImageFile(path, size[0], size[1], mode, frames, sixteen, transparent)


_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "F")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in _ALPHA:
        return img.getchannel("A").getextrema()[0] < 255
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def load_image(path: str | Path, *, at_least: tuple[int, int] | None = None) -> Image.Image:
    """The image as an RGB PIL image: EXIF orientation applied, transparency composited on white.

    `at_least` (w, h) lets a large JPEG decode at a reduced scale that still covers that size (a 24 MP
    photo headed for a 512 bucket decodes several times faster); other formats ignore it.
    """
    path = Path(path)
    with _open(path) as img:
        try:
            if at_least is not None and img.format == "JPEG":
                w, h = at_least
                rotated = displayed_size(img) != img.size
                img.draft("RGB", (h, w) if rotated else (w, h))
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"'{path}' is damaged ({exc}). Re-export it or remove it.") from None
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited on white; 16-bit and float modes scaled into 8 bits."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float32)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in _ALPHA or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def scan_images(paths_or_folder, *, min_size: int = 1) -> tuple[list[ImageFile], list[tuple[Path, str]]]:
    """Probe images: returns (usable images, [(path, reason)] skipped as corrupt or smaller than min_size).

    Accepts a folder (its direct image files) or an iterable of paths.
    """
    if isinstance(paths_or_folder, (str, Path)):
        paths = list_image_paths(paths_or_folder)
    else:
        paths = [Path(p) for p in paths_or_folder]
    good: list[ImageFile] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            info = probe_image(path)
        except DatasetError as exc:
            skipped.append((path, _short_reason(str(exc))))
            continue
        if min(info.width, info.height) < min_size:
            skipped.append((path, f"too small ({info.width}x{info.height}, minimum side {min_size})"))
            continue
        good.append(info)
    return good, skipped


def _short_reason(message: str) -> str:
    if "too large" in message:
        return "too large to open safely"
    return "damaged or not an image"


def describe_skipped(skipped: list[tuple[Path, str]], root: str | Path | None = None, limit: int = 20) -> str:
    """'2 images that cannot be used — a.png: damaged or not an image; b.jpg: too small (...)'."""
    listed = "; ".join(f"{relative_name(p, root)}: {why}" for p, why in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"{len(skipped)} image{'s' * (len(skipped) != 1)} that cannot be used — {listed}{more}"


def skipped_warning(skipped: list[tuple[Path, str]], root: str | Path | None = None, limit: int = 20) -> str:
    """One user-facing line listing every skipped image (first `limit` named)."""
    return (f"Skipped {describe_skipped(skipped, root, limit)}. Re-export or delete them to silence this "
            f"warning.")


def relative_name(path: Path, root: str | Path | None) -> str:
    """`path` relative to `root` (forward slashes), or its name when it is not under `root`."""
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return Path(path).name
