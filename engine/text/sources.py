"""Text files -> samples: what a user's data says, before any tokenizer sees it.

A sample is plain text (every token trained), a prompt with a completion (the completion trained), or a
chat (`messages`, trained on the assistant turns). Formats people bring:

- `.txt` / `.md`: one sample a line, as lora-scripts' guides say, or documents separated by blank lines
  (`text_split: auto` takes documents when blank lines separate blocks most of which span several lines),
- `.jsonl` / `.json`: records with `text` (or `text_column`), chat `messages` (also ShareGPT's
  `conversations` with `from`/`value`), `prompt` + `completion` (TRL), or Alpaca's
  `instruction` / `input` / `output` (made a user turn and an assistant turn);
- `.csv`: the same keys as columns.

Every file is read as UTF-8 (engine/data/captions.read_text refuses other encodings with the file named);
each sample remembers where it came from (`data.txt line 12`) so reports and errors can point at it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.captions import read_text
from ..errors import DatasetError

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool"}


@dataclass
class Sample:
    where: str
    segments: list[tuple[str, bool]] | None = None  # (text, trained) pieces joined in order
    messages: list[dict[str, str]] | None = None  # chat turns: {"role", "content"}

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class Samples:
    samples: list[Sample] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # where an empty or assistant-less record was skipped
    notes: list[str] = field(default_factory=list)  # how a file was read, where that was a guess


def data_files(path: str | Path) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            raise DatasetError(f"'{p}' is not a text data file; use .txt, .md, .jsonl, .json or .csv.")
        return [p]
    if not p.is_dir():
        raise DatasetError(f"'{p}' does not exist.")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise DatasetError(f"no .txt, .md, .jsonl, .json or .csv files in '{p}'.")
    return files


def read_samples(path: str | Path, *, text_column: str = "text", text_split: str = "auto") -> Samples:
    """Every sample in a file or folder; a folder's files in name order."""
    out = Samples()
    for f in data_files(path):
        out.files.append(f)
        if f.suffix.lower() in TEXT_SUFFIXES:
            _read_txt(f, text_split, out)
        else:
            for where, record in _records(f):
                sample = record_sample(record, where, text_column)
                if sample is None:
                    out.skipped.append(where)
                else:
                    out.samples.append(sample)
    if not out.samples:
        raise DatasetError(f"no text to train on in '{path}'" + (f" ({len(out.skipped)} empty records)"
                                                                   if out.skipped else "") +
                           ": the file is empty or only blank. Put one sample a line in a .txt file, or records "
                           "with a text or messages field in a .jsonl file.")
    return out


def _read_txt(path: Path, mode: str, out: Samples) -> None:
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        if text.strip():
            out.samples.append(Sample(f"{path.name}", segments=[(text.strip(), True)]))
        return
    blocks: list[tuple[int, list[str]]] = []  # (first line number, the block's lines), split at blank lines
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if blocks and blocks[-1][0] + len(blocks[-1][1]) == number:
            blocks[-1][1].append(line)
        else:
            blocks.append((number, [line]))
    paragraphs = mode == "paragraph" or (mode == "auto" and len(blocks) > 1
                                         and 2 * sum(len(lines) > 1 for _, lines in blocks) > len(blocks))
    if paragraphs and mode == "auto":
        out.notes.append(f"{path.name}: read as {len(blocks)} documents separated by blank lines (text_split: "
                         f"auto); set text_split: line for one sample a line")
    for first, lines in blocks:
        if paragraphs:
            out.samples.append(Sample(f"{path.name} line {first}", segments=[("\n".join(lines).strip(), True)]))
        else:
            out.samples.extend(Sample(f"{path.name} line {first + i}", segments=[(line.strip(), True)])
                               for i, line in enumerate(lines))


def _records(path: Path):
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for i, row in enumerate(reader, start=2):
            yield f"{path.name} row {i}", {k.strip(): v for k, v in row.items() if k is not None}
        return
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); a .json file holds "
                               f"a list of records (or use .jsonl, one record a line).") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        for i, record in enumerate(data):
            yield f"{path.name} record {i + 1}", record
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path.name} line {i}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path.name} line {i} is not JSON ({exc.msg}); a .jsonl file holds one record "
                               f"a line, such as {{\"text\": \"...\"}} or {{\"messages\": [...]}}.") from None


def record_sample(record: Any, where: str, text_column: str = "text") -> Sample | None:
    """One record (a JSON object or CSV row) as a sample; None when it holds nothing to train on."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is {type(record).__name__}, not a record with keys such as text or messages.")
    turns = record.get("messages", record.get("conversations"))
    if turns is not None:
        messages = _messages(turns, where)
        return Sample(where, messages=messages) if any(m["role"] == "assistant" and m["content"].strip()
                                                      for m in messages) else None
    if text_column in record:
        text = _string(record[text_column], where, text_column)
        return Sample(where, segments=[(text, True)]) if text.strip() else None
    if "prompt" in record and "completion" in record:
        prompt, completion = (_string(record[k], where, k) for k in ("prompt", "completion"))
        return Sample(where, segments=[(prompt, False), (completion, True)]) if completion.strip() else None
    if "instruction" in record and "output" in record:
        user = _string(record["instruction"], where, "instruction")
        extra = _string(record.get("input") or "", where, "input")
        messages = ([{"role": "system", "content": _string(record["system"], where, "system")}]
                    if record.get("system") else [])
        messages += [{"role": "user", "content": f"{user}\n\n{extra}" if extra.strip() else user},
                     {"role": "assistant", "content": _string(record["output"], where, "output")}]
        return Sample(where, messages=messages) if messages[-1]["content"].strip() else None
    keys = ", ".join(map(str, record)) or "none"
    raise DatasetError(f"{where} has no field to train on (its keys: {keys}). Give `{text_column}` (or set "
                       f"text_column), `messages`, `prompt` + `completion`, or `instruction` + `output`.")


def _string(value: Any, where: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: `{key}` must be text, got {type(value).__name__}.")
    return value


def _messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: messages must be a non-empty list of {{role, content}} turns.")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: turn {i + 1} is not a {{role, content}} mapping.")
        role = turn.get("role", _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise DatasetError(f"{where}: turn {i + 1} has role {role or turn.get('from')!r}; use one of "
                               f"{', '.join(ROLES)}.")
        out.append({"role": role, "content": _string(content, where, f"turn {i + 1} content")})
    return out
