"""Where captions come from: sidecar files and metadata.csv / metadata.jsonl.

Users arrive with captions in whichever shape their previous tool wrote: kohya / GUI sidecars
(`img.txt`, `img.caption`), HF imagefolder `metadata.jsonl` / `metadata.csv` with a `file_name,text`
header, or lora-scripts' header-less `img01.jpg,"caption"` rows. All are read as UTF-8 (a BOM is
fine, as is UTF-16 with its BOM, which Windows Notepad writes); anything else raises a DatasetError
that names the file and says to re-save it as UTF-8, instead of training on mojibake.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("text", "caption", "prompt")


def read_text(path: str | Path) -> str:
    """A text file as str: UTF-8 (BOM tolerated) or UTF-16 with a BOM; other encodings are refused."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"'{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}); it was "
            f"probably saved as a local encoding such as Windows-1252 or GBK. Re-save it as UTF-8 (in "
            f"Notepad: Save As -> Encoding: UTF-8) and run again.") from None


def first_line(text: str) -> str:
    """The first non-empty line, stripped (kohya reads only the first line of a caption file)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def sidecar_path(image_path: str | Path, extension: str = ".txt") -> Path:
    """`photo.jpg` -> `photo.txt` (the file a captioner writes)."""
    ext = extension if extension.startswith(".") else "." + extension
    return Path(image_path).with_suffix(ext)


def sidecar_caption(image_path: str | Path, caption_extension: str = ".txt") -> tuple[str, Path] | None:
    """(caption, file) from the image's sidecar: `caption_extension` first, then the other known one.

    Returns None when no sidecar exists; an existing but empty sidecar gives ("", file).
    """
    first = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    order = [first] + [e for e in CAPTION_EXTENSIONS if e != first.lower()]
    for ext in order:
        path = sidecar_path(image_path, ext)
        if path.is_file():
            return first_line(read_text(path)), path
    return None


def find_metadata(folder: str | Path) -> Path | None:
    """metadata.jsonl (preferred) or metadata.csv inside `folder`, if present."""
    for name in METADATA_NAMES:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def load_metadata(path: str | Path) -> dict[str, str]:
    """{file_name as written (forward slashes): caption} from a .csv or .jsonl file."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path)
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    raise DatasetError(f"metadata file '{path}' must be .csv or .jsonl.")


def _key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _load_jsonl(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"'{path}' line {number} is not valid JSON ({exc.msg}). Each line must be an "
                               f'object like {{"file_name": "img01.jpg", "text": "a caption"}}.') from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DatasetError(f"'{path}' line {number} has no \"file_name\". Each line must be an object "
                               f'like {{"file_name": "img01.jpg", "text": "a caption"}}.')
        column = next((c for c in _CAPTION_COLUMNS if c in row), None)
        caption = "" if column is None or row[column] is None else str(row[column])
        out[_key(str(row["file_name"]))] = caption.strip()
    return out


def _load_csv(path: Path) -> dict[str, str]:
    rows = [r for r in csv.reader(io.StringIO(read_text(path), newline="")) if any(c.strip() for c in r)]
    if not rows:
        return {}
    header = [c.strip().lower() for c in rows[0]]
    name_col, text_col = 0, 1
    if "file_name" in header:
        name_col = header.index("file_name")
        text_col = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), -1)
        if text_col < 0:
            raise DatasetError(f"'{path}' has a header without a caption column; name it 'text' (or "
                               f"'caption'), e.g. file_name,text")
        rows = rows[1:]
        joined = False
    else:
        joined = True  # header-less `img01.jpg,caption`: unquoted commas belong to the caption
    out: dict[str, str] = {}
    for number, row in enumerate(rows, 2 if not joined else 1):
        if len(row) <= name_col or not row[name_col].strip():
            raise DatasetError(f"'{path}' row {number} has no file name. Rows must look like "
                               f'img01.jpg,"a caption, with commas inside quotes"')
        if joined:
            caption = ",".join(row[1:])
        else:
            caption = row[text_col] if text_col < len(row) else ""
        out[_key(row[name_col])] = caption.strip()
    return out


class MetadataCaptions:
    """Looks captions up by path relative to the metadata's folder or the data root, then by bare name."""

    def __init__(self, path: str | Path, roots: list[Path]):
        self.path = Path(path)
        self.entries = load_metadata(self.path)
        self.roots = [self.path.parent, *roots]
        by_name: dict[str, list[str]] = {}
        for key in self.entries:
            by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
        self._by_name = by_name
        self._used: set[str] = set()

    def lookup(self, image_path: Path) -> str | None:
        for root in self.roots:
            try:
                rel = image_path.relative_to(root).as_posix()
            except ValueError:
                continue
            if rel in self.entries:
                self._used.add(rel)
                return self.entries[rel]
        keys = self._by_name.get(image_path.name, [])
        if len(keys) == 1:
            self._used.add(keys[0])
            return self.entries[keys[0]]
        return None

    def unused(self) -> list[str]:
        """Entries that matched no image (typos, deleted files)."""
        return [k for k in self.entries if k not in self._used]
