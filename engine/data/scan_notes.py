"""What a dataset scan tells the user about files it did not use, or used differently than they are.

Every file in a dataset folder is either trained on or named once: images in a format that is not
read, captions without an image, other files; animated images (the first frame is used); images
converted on the way in (CMYK, 16-bit, transparency: one line each); caption files that are not
UTF-8 (decoded when the encoding is certain, else the image's fallback caption is used); images
whose metadata file and sidecar disagree (the metadata file wins). Each of these is one warning line.
"""

from __future__ import annotations

from pathlib import Path

from .captions import CAPTION_EXTENSIONS, METADATA_NAMES, CaptionEncodingError
from .images import IMAGE_EXTENSIONS, ImageFile, relative_name

_OTHER_IMAGES = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".jp2", ".ico", ".svg")
_LIMIT = 8


def _names(paths: list[Path], root: Path) -> str:
    listed = ", ".join(relative_name(p, root) for p in paths[:_LIMIT])
    return listed + (f" and {len(paths) - _LIMIT} more" if len(paths) > _LIMIT else "")


def unused_files(folders: list[Path], images: list[Path], root: Path, extra_used: set[Path]) -> str | None:
    """One line naming every file in `folders` that training does not read (grouped by kind)."""
    used = {p.resolve() for p in images} | {p.resolve() for p in extra_used}
    stems = {(p.parent.resolve(), p.stem) for p in images}
    kinds: dict[str, list[Path]] = {}
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            suffix = path.suffix.lower()
            if path.resolve() in used or suffix in IMAGE_EXTENSIONS or path.name in METADATA_NAMES:
                continue
            if suffix in CAPTION_EXTENSIONS:
                if (path.parent.resolve(), path.stem) in stems:
                    continue  # a sidecar: read (or named by the encoding warning)
                kind = "caption files without an image of the same name"
            elif suffix == ".bak":
                kind = "backups (.bak, e.g. captions an auto-captioner replaced)"
            elif suffix == ".npz":
                kind = "kohya latent caches (.npz; this trainer keeps its own)"
            elif suffix in _OTHER_IMAGES:
                kind = f"images in a format that is not read ({', '.join(s.lstrip('.') for s in IMAGE_EXTENSIONS)} " \
                       f"are; convert them)"
            else:
                kind = "other files"
            kinds.setdefault(kind, []).append(path)
    if not kinds:
        return None
    parts = [f"{len(paths)} {kind}: {_names(paths, root)}" for kind, paths in kinds.items()]
    return f"Not used for training in '{root}': " + "; ".join(parts) + "."


def conversions(images: list[ImageFile], root: Path) -> list[str]:
    """One line per kind of image that is changed on its way to 8-bit RGB."""
    lines = []
    for test, text in (
            (lambda i: i.frames > 1, "animated image(s): only the first frame is trained on"),
            (lambda i: i.mode == "CMYK", "CMYK image(s) are converted to RGB (colours may shift; export them as RGB)"),
            (lambda i: i.sixteen_bit, "16-bit image(s) are reduced to 8 bits per channel"),
            (lambda i: i.transparent, "image(s) with transparent pixels are put on a white background")):
        found = [i for i in images if test(i)]
        if found:
            frames = {i.path: f" ({i.frames} frames)" for i in found if i.frames > 1}
            listed = ", ".join(relative_name(i.path, root) + frames.get(i.path, "") for i in found[:_LIMIT])
            more = f" and {len(found) - _LIMIT} more" if len(found) > _LIMIT else ""
            lines.append(f"{len(found)} {text}: {listed}{more}.")
    return lines


def encodings(undecodable: list[CaptionEncodingError], utf16: list[Path], root: Path) -> str | None:
    """One line naming every caption file that is not UTF-8, what was done with it, and the fix."""
    if not undecodable and not utf16:
        return None
    parts = []
    if undecodable:
        listed = ", ".join(f"{relative_name(e.path, root)} (probably {e.guess})" for e in undecodable[:_LIMIT])
        more = f" and {len(undecodable) - _LIMIT} more" if len(undecodable) > _LIMIT else ""
        parts.append(f"{len(undecodable)} could not be decoded for sure and were not used, so their images train "
                     f"with their fallback caption (the kohya folder name, or an empty one): {listed}{more}")
    if utf16:
        parts.append(f"{len(utf16)} are UTF-16 without a byte-order mark and were read as such: {_names(utf16, root)}")
    return (f"{len(undecodable) + len(utf16)} caption file(s) are not UTF-8: " + "; ".join(parts) +
            ". Re-save them as UTF-8 (Notepad: Save As -> Encoding: UTF-8; or iconv -f GBK -t UTF-8 old.txt > "
            "new.txt).")


def disagreements(images: list[Path], metadata: Path, root: Path) -> str | None:
    if not images:
        return None
    return (f"{len(images)} image(s) have a caption in {metadata.name} and a different one in their caption file; "
            f"{metadata.name} wins (it is read first): {_names(images, root)}. Delete the caption you do not want.")
