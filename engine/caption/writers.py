"""Writing captions to disk without ever losing the user's previous ones.

Every file is written to a temporary file beside it and renamed over the target (so a crash or a
full disk leaves either the old or the new file, never half of one), and a file whose content changes
is first copied to `<file>.bak`. Three shapes, all read back by engine/data/captions.py: sidecars
(`img01.txt`), `metadata.csv` (lora-scripts' header-less `img01.jpg,"caption"` rows, or `file_name,text`
when the existing file had that header) and `metadata.jsonl` (`{"file_name": ..., "text": ...}`, any
other columns of an existing file kept). Text is UTF-8 without BOM.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from ..data.captions import load_metadata, read_text, sidecar_path
from ..errors import DatasetError
from ..lora.kohya_io import FILE_MODE

FORMATS = ("txt", "csv", "jsonl")


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def write_atomic(path: str | Path, text: str, *, backup: bool = True) -> bool:
    """Write `text` (UTF-8) to `path` atomically; keep the old file as `.bak`. False if unchanged."""
    path = Path(path)
    data = text.encode("utf-8")
    if path.is_file():
        if path.read_bytes() == data:
            return False
        if backup:
            shutil.copy2(path, backup_path(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; captions stay readable like the user's other files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DatasetError(f"cannot write '{path}': {exc.strerror or exc}. Check that the folder is "
                           f"writable and the disk is not full; the previous file is unchanged.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def metadata_key(image: Path, root: Path) -> str:
    """The `file_name` of an image in a metadata file: relative to the root, forward slashes."""
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return image.name


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def _name_field(name: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([name])
    return buf.getvalue()


def _single_line(caption: str) -> str:
    return " ".join(caption.split())


def format_csv(entries: Mapping[str, str], *, header: bool = False) -> str:
    """`img01.jpg,"caption"` rows (the caption always quoted, as lora-scripts writes it)."""
    lines = ["file_name,text"] if header else []
    lines += [f"{_name_field(name)},{_quote(_single_line(cap))}" for name, cap in entries.items()]
    return "\n".join(lines) + "\n" if lines else ""


def _norm(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _merge_keys(existing: dict, updates: Mapping[str, str]) -> dict[str, str]:
    """Existing entries updated in place (matched by relative path, else by a bare file name), new ones
    appended. Rows for images not captioned now are kept as they were."""
    merged = dict(existing)
    bare = {}
    for key in existing:
        bare.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    for key, caption in updates.items():
        if key in merged:
            merged[key] = caption
            continue
        same_name = bare.get(key.rsplit("/", 1)[-1], [])
        merged[same_name[0] if len(same_name) == 1 and "/" not in same_name[0] else key] = caption
    return merged


def write_sidecars(captions: Mapping[Path, str], extension: str = ".txt") -> list[Path]:
    """One caption file per image (`img01.jpg` -> `img01.txt`); returns the files that changed."""
    written = []
    for image, caption in captions.items():
        target = sidecar_path(image, extension)
        if write_atomic(target, _single_line(caption)):
            written.append(target)
    return written


def write_metadata(path: str | Path, captions: Mapping[Path, str], root: str | Path) -> bool:
    """Merge `captions` into metadata.csv / metadata.jsonl at `path` (created if missing)."""
    path, root = Path(path), Path(root)
    updates = {metadata_key(image, root): caption for image, caption in captions.items()}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        existing = load_metadata(path) if path.is_file() else {}
        header = path.is_file() and _has_header(path)
        return write_atomic(path, format_csv(_merge_keys(existing, updates), header=header))
    if suffix == ".jsonl":
        return write_atomic(path, _format_jsonl(path, updates))
    raise DatasetError(f"metadata output '{path}' must end in .csv or .jsonl.")


def _has_header(path: Path) -> bool:
    first = next(csv.reader(io.StringIO(read_text(path))), [])
    return "file_name" in [c.strip().lower() for c in first]


def _format_jsonl(path: Path, updates: Mapping[str, str]) -> str:
    rows: dict[str, dict] = {}
    if path.is_file():
        load_metadata(path)  # validates the file with a clear message before we rewrite it
        for line in read_text(path).splitlines():
            if line.strip():
                row = json.loads(line)
                rows[_norm(str(row["file_name"]))] = row
    out = []
    for key, caption in _merge_keys({k: None for k in rows}, updates).items():
        row = dict(rows.get(key) or {"file_name": key})
        if caption is not None:
            column = next((c for c in ("text", "caption", "prompt") if c in row), "text")
            row[column] = _single_line(caption)
        out.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(out) + "\n" if out else ""
