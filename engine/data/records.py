"""A dataset folder -> the list of usable images, each with its caption and repeat count.

Layouts: a flat folder of images (repeats from the config) or kohya's `N_name` subfolders (N repeats,
`name` as the caption of images that have none); both may sit side by side. Caption precedence:
metadata file > sidecar (.txt/.caption) > folder class tokens > "". Problems the user should see
(skipped images, images without captions, unmatched metadata rows, ignored folders, and what
scan_notes.py reports: unused files, converted images, caption encodings, metadata/sidecar
disagreements) are collected as warnings, each once; a folder with nothing usable raises a
DatasetError that says what was found instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from . import scan_notes
from .captions import CaptionEncodingError, MetadataCaptions, find_metadata, read_sidecar
from .images import IMAGE_EXTENSIONS, describe_contents, describe_skipped, list_image_paths, scan_images, \
    skipped_warning

_KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")
CLIP_TOKEN_LIMIT = 75


@dataclass
class ImageRecord:
    """One training (or regularisation) image and everything decided about it at scan time."""

    path: Path
    width: int  # as displayed (EXIF applied)
    height: int
    caption: str
    caption_source: str  # "metadata" | "sidecar" | "folder" | "none"
    subset: str
    repeats: int
    is_reg: bool = False


@dataclass
class Subset:
    """A folder of images sharing a repeat count (kohya: one `N_name` folder)."""

    name: str
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    records: list[ImageRecord] = field(default_factory=list)


@dataclass
class ScanResult:
    subsets: list[Subset]
    warnings: list[str]
    undecodable: list[DatasetError] = field(default_factory=list)  # caption files not used (named in warnings)

    @property
    def records(self) -> list[ImageRecord]:
        return [r for s in self.subsets for r in s.records]


def parse_kohya_dirname(name: str) -> tuple[int, str] | None:
    """'10_my cat' -> (10, 'my cat'); None for names that are not `N_name`."""
    m = _KOHYA_DIR.match(name)
    return (int(m.group(1)), m.group(2).strip()) if m else None


def estimate_tokens(caption: str) -> int:
    """A rough CLIP token count (words and punctuation); good enough to warn about truncation."""
    return len(re.findall(r"\w+|[^\w\s]", caption))


def scan_dataset(folder: str | Path, *, repeats: int = 1, caption_extension: str = ".txt",
                 metadata_path: str | Path = "", min_image_size: int = 64, is_reg: bool = False,
                 use_folder_metadata: bool = True, token_limit: int = CLIP_TOKEN_LIMIT) -> ScanResult:
    """Discover subsets and images under `folder`, read their captions. Raises DatasetError if none."""
    kind = "regularisation" if is_reg else "training"
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"The {kind} image folder '{folder}' does not exist or is not a folder.")
    warnings: list[str] = []
    subsets: list[Subset] = []
    ignored: list[tuple[str, int]] = []
    if list_image_paths(root):
        subsets.append(Subset(root.name or str(root), root, repeats, "", is_reg))
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name):
        parsed = parse_kohya_dirname(sub.name)
        n_images = len(list_image_paths(sub))
        if parsed is None:
            if n_images:
                ignored.append((sub.name, n_images))
            continue
        n, tokens = parsed
        if n == 0:
            warnings.append(f"Folder '{sub.name}' asks for 0 repeats, so its images are not used.")
            continue
        subsets.append(Subset(sub.name, sub, n, tokens, is_reg))
    if ignored:
        names = ", ".join(f"'{name}' ({k} image{'s' * (k != 1)})" for name, k in ignored)
        warnings.append(f"Ignored subfolder(s) {names} in '{root}': only kohya-style 'N_name' folders "
                        f"(e.g. '10_{ignored[0][0]}', N = repeats) are read.")
    if not subsets:
        raise DatasetError(_nothing_found(root, kind, ignored))

    meta = None
    meta_file = Path(metadata_path).expanduser() if metadata_path else (
        find_metadata(root) if use_folder_metadata else None)
    if meta_file is not None:
        if not meta_file.is_file():
            raise DatasetError(f"metadata_path '{metadata_path}' does not exist.")
        meta = MetadataCaptions(meta_file, [root])

    skipped_all: list[tuple[Path, str]] = []
    no_caption: list[Path] = []
    long_captions: list[Path] = []
    found = _Found()
    scanned = []
    for subset in subsets:
        images, skipped = scan_images(list_image_paths(subset.folder), min_size=min_image_size)
        skipped_all += skipped
        scanned += images
        for img in images:
            caption, source = _caption_for(img.path, meta, caption_extension, subset.class_tokens, found)
            if source == "none" and not found.named(img.path):  # an undecodable caption is named once, there
                no_caption.append(img.path)
            if estimate_tokens(caption) > token_limit:
                long_captions.append(img.path)
            subset.records.append(ImageRecord(img.path, img.width, img.height, caption, source,
                                              subset.name, subset.repeats, is_reg))
    if skipped_all:
        warnings.append(skipped_warning(skipped_all, root))
    subsets = [s for s in subsets if s.records]
    if not subsets:
        raise DatasetError(f"No usable {kind} images in '{root}': {describe_skipped(skipped_all, root)}. Replace or "
                           f"remove them (images need at least {min_image_size}px a side).")
    folders = sorted({root, *(s.folder for s in subsets)})
    warnings += [w for w in (
        scan_notes.unused_files(folders, [p for p, _ in skipped_all] + [i.path for i in scanned], root,
                                {meta.path} if meta is not None else set()),
        *scan_notes.conversions(scanned, root),
        scan_notes.encodings(found.undecodable, found.utf16, root),
        scan_notes.disagreements(found.disagreeing, meta.path, root) if meta is not None else None) if w]
    if no_caption and not is_reg:
        warnings.append(f"{len(no_caption)} image(s) have no caption ({_names(no_caption, root)}); they "
                        f"train with an empty caption (plus the trigger word, if set). Add .txt captions "
                        f"or run AutoCaption.")
    if long_captions:
        more = " (max_token_length: 150 or 225 keeps more)" if token_limit < 225 else ""
        warnings.append(f"{len(long_captions)} caption(s) are probably longer than the {token_limit} tokens "
                        f"the text encoder sees and will be truncated{more} ({_names(long_captions, root)}).")
    if meta is not None and meta.unused():
        unused = meta.unused()
        warnings.append(f"{len(unused)} row(s) of {meta.path.name} match no image in '{root}': "
                        f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}.")
    return ScanResult(subsets, warnings, list(found.undecodable))


@dataclass
class _Found:
    """What reading the captions noticed, for scan_notes."""
    undecodable: list[CaptionEncodingError] = field(default_factory=list)
    utf16: list[Path] = field(default_factory=list)
    disagreeing: list[Path] = field(default_factory=list)

    def named(self, image: Path) -> bool:
        return any(e.path.stem == image.stem and e.path.parent == image.parent for e in self.undecodable)


def _caption_for(path: Path, meta: MetadataCaptions | None, caption_extension: str,
                 class_tokens: str, found: _Found) -> tuple[str, str]:
    caption = meta.lookup(path) if meta is not None else None
    try:
        sidecar = read_sidecar(path, caption_extension)
    except CaptionEncodingError as exc:
        if not caption:  # with a metadata caption the sidecar is not used anyway
            found.undecodable.append(exc)
        sidecar = None
    if sidecar is not None and sidecar.encoding == "utf-16 without BOM":
        found.utf16.append(sidecar.path)
    if caption:
        if sidecar is not None and sidecar.caption and sidecar.caption != caption:
            found.disagreeing.append(path)
        return caption, "metadata"
    if sidecar is not None and sidecar.caption:
        return sidecar.caption, "sidecar"
    if class_tokens:
        return class_tokens, "folder"
    return "", "none"


def _names(paths: list[Path], root: Path, limit: int = 8) -> str:
    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.name
    listed = ", ".join(rel(p) for p in paths[:limit])
    return listed + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _nothing_found(root: Path, kind: str, ignored: list[tuple[str, int]]) -> str:
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    msg = f"No {kind} images in '{root}': it contains {describe_contents(root)}. Expected {exts} images"
    if ignored:
        name, k = ignored[0]
        return (f"{msg} directly in the folder or in kohya 'N_name' subfolders. Subfolder '{name}' has {k} "
                f"image{'s' * (k != 1)} but is not named 'N_name': rename it (e.g. '10_{name}' for 10 "
                f"repeats) or point the folder setting at it.")
    return f"{msg}, directly in the folder or in kohya 'N_name' subfolders (e.g. '10_mychar')."
