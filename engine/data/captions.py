"""Where captions come from: sidecar files and metadata.csv / metadata.jsonl.

Users arrive with captions in whichever shape their previous tool wrote: kohya / GUI sidecars
(`img.txt`, `img.caption`), HF imagefolder `metadata.jsonl` / `metadata.csv` with a `file_name,text`
header, or lora-scripts' header-less `img01.jpg,"caption"` rows. All are read as UTF-8 (a BOM is
fine, as is UTF-16 with its BOM, which Windows Notepad writes). A file in another encoding is decoded
only when that encoding is certain (UTF-16 without a BOM shows itself by its zero bytes); GBK,
Windows-1252 and friends cannot be told apart for sure, so such a file raises `CaptionEncodingError`
naming it, its likely encoding and the fix, instead of training on mojibake (the dataset scan then
uses the image's fallback caption and names every such file in one warning).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("text", "caption", "prompt")


class CaptionEncodingError(DatasetError):
    """A text file whose encoding is not UTF-8 and cannot be known for sure."""

    def __init__(self, path: Path, guess: str, position: int, byte: int):
        self.path, self.guess = Path(path), guess
        super().__init__(f"'{path}' is not UTF-8 text (byte 0x{byte:02x} at position {position}; probably {guess}). "
                         f"Re-save it as UTF-8 (in Notepad: Save As -> Encoding: UTF-8) and run again.")


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 text without a byte-order mark, recognised by the zero high bytes of its Latin characters."""
    if len(data) < 4 or len(data) % 2:
        return None
    even, odd = data[0::2], data[1::2]
    for zeros, other, codec in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) >= 0.4 * len(zeros) and other.count(0) <= 0.05 * len(other):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError:
                return None
            return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None
    return None


def _guess(data: bytes) -> str:
    """A likely encoding for the message (never used to decode: these cannot be told apart for sure)."""
    for codec, name, test in (("gb18030", "GBK", lambda t: any("\u4e00" <= c <= "\u9fff" for c in t)),
                              ("shift_jis", "Shift-JIS", lambda t: any("\u3040" <= c <= "\u30ff" for c in t)),
                              ("cp1252", "Windows-1252", lambda t: True)):
        try:
            if test(data.decode(codec)):
                return name
        except UnicodeDecodeError:
            continue
    return "a local encoding"


def decode_text(path: str | Path) -> tuple[str, str]:
    """(text, encoding) of a text file: UTF-8 (BOM tolerated), UTF-16 with a BOM, or UTF-16 without one
    ("utf-16 without BOM"); a CaptionEncodingError for anything else."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    if b"\x00" in data:  # never in UTF-8 text (though valid UTF-8): UTF-16 without its BOM, or not text
        text = _utf16_without_bom(data)
        if text is not None:
            return text, "utf-16 without BOM"
        raise CaptionEncodingError(path, "UTF-16 or a binary file", data.index(b"\x00"), 0)
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        raise CaptionEncodingError(path, _guess(data), exc.start, data[exc.start]) from None


def read_text(path: str | Path) -> str:
    """A text file as str (see decode_text); a CaptionEncodingError when its encoding is not certain."""
    return decode_text(path)[0]


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


@dataclass
class Sidecar:
    caption: str  # its first non-empty line
    path: Path
    encoding: str  # as decode_text says


def read_sidecar(image_path: str | Path, caption_extension: str = ".txt") -> Sidecar | None:
    """The image's sidecar: `caption_extension` first, then the other known one. None when none exists
    (an existing but empty one gives caption ""); a CaptionEncodingError when it cannot be decoded."""
    first = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    order = [first] + [e for e in CAPTION_EXTENSIONS if e != first.lower()]
    for ext in order:
        path = sidecar_path(image_path, ext)
        if path.is_file():
            text, encoding = decode_text(path)
            return Sidecar(first_line(text), path, encoding)
    return None


def sidecar_caption(image_path: str | Path, caption_extension: str = ".txt") -> tuple[str, Path] | None:
    """(caption, file) from the image's sidecar (see read_sidecar)."""
    found = read_sidecar(image_path, caption_extension)
    return None if found is None else (found.caption, found.path)


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
