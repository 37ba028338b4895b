"""LoRA file names a user chooses: safe, inside their folder, and never an earlier file's.

A name may carry subfolders (`styles/ink`) but must stay inside the folder it is written to: `..`,
absolute paths and drive letters are refused with a message that says what to type instead. An
existing file is never replaced unless asked: the next free `name_2`, `name_3`... is used, because
loaders cache files by name (ComfyUI's LoraLoader keeps the last file it read) and a replaced file
would silently keep serving old weights. ComfyUI's Save LoRA and the command line use the same rules.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Callable

from ..errors import UserError

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
EXAMPLE = "a plain name like 'my_style' or a subfolder like 'styles/my_style'"
FOLDER = "the LoRA folder (ComfyUI's models/loras; the command line's output_dir)"


def check_name(name: str) -> PurePosixPath:
    """The name as a relative path inside the LoRA folder, or a UserError saying what is wrong."""
    text = str(name or "").strip()
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    if not text:
        raise UserError(f"the LoRA name is empty; use {EXAMPLE}.")
    if re.match(r"^[a-zA-Z]:", text) or text.startswith(("/", "\\", "~")):
        raise UserError(f"the LoRA name '{name}' is an absolute path; files are always written into "
                        f"{FOLDER}, so use {EXAMPLE}.")
    path = PurePosixPath(text.replace("\\", "/"))
    if any(part in ("..", ".") for part in path.parts):
        raise UserError(f"the LoRA name '{name}' contains '..' or '.', which could leave {FOLDER}; "
                        f"use {EXAMPLE}.")
    if _BAD_CHARS.search(text) or any(p != p.strip() or p.endswith(".") for p in path.parts):
        raise UserError(f"the LoRA name '{name}' has characters that are not allowed in file names "
                        f"(< > : \" | ? * or a part ending in a space or dot); use {EXAMPLE}.")
    return path


def free_name(name: str, taken: Callable[[str], bool]) -> str:
    """`name`, or the first of `name_2`, `name_3`, ... that is not `taken`."""
    if not taken(name):
        return name
    n = 2
    while taken(f"{name}_{n}"):
        n += 1
    return f"{name}_{n}"


def target_path(root: Path, name: str, overwrite: bool = False) -> Path:
    """Where `name` goes under `root`: `<name>.safetensors`, or the next free numbered name."""
    rel = check_name(name)
    base = Path(root).joinpath(*rel.parts)
    if overwrite:
        return base.with_name(base.name + ".safetensors")
    stem = free_name(base.name, lambda n: base.with_name(n + ".safetensors").exists())
    return base.with_name(stem + ".safetensors")


def unused_run_name(output_dir: str | Path, name: str) -> str:
    """`name`, or the first free `name_2`, ... when `<output_dir>/<name>/` already holds an earlier run's
    LoRA file (the command line's run folders)."""
    root = Path(output_dir).expanduser()
    return free_name(name, lambda n: any((root / n).glob("*.safetensors")))
