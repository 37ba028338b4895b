"""Caption text: tag formatting, the trigger word, merging with existing captions, the tag summary.

A LoRA learns what its captions say, so these small rules matter: booru tags come with underscores
(`long_hair`) that CLIP reads better as spaces, except in kaomoji (`^_^`) where the underscore is the
face; parentheses are prompt weighting syntax in A1111 and ComfyUI, so a tag such as `hood (pokemon)`
must be written `hood \\(pokemon\\)`; and the trigger word goes first so `keep_tokens=1` keeps it there.
Splitting, the trigger rule and tag counting are engine/data/text.py's, so a caption is read the same
way when it is written here and when it is trained on (and counted for `ss_tag_frequency`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from ..data.text import split_tags, with_trigger

# Tags in which the underscore is part of the face (the list SmilingWolf's taggers are shown with).
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})

MODES = ("overwrite", "skip", "append", "prepend")


def is_kaomoji(tag: str) -> bool:
    """Short tags (`^_^`, `o_o`) and the known face tags keep their underscores."""
    return tag in KAOMOJI or len(tag) <= 3


def format_tag(tag: str, *, replace_underscore: bool = True, escape_parentheses: bool = True) -> str:
    """One model tag as it should appear in a caption."""
    tag = tag.strip()
    if replace_underscore and not is_kaomoji(tag):
        tag = tag.replace("_", " ")
    if escape_parentheses:
        tag = re.sub(r"(?<!\\)([()])", r"\\\1", tag)
    return tag


def tag_key(tag: str) -> str:
    """Comparison form of a tag: `Long_Hair` matches `long hair`, and `a \\(b\\)` matches `a (b)`."""
    return re.sub(r"\s+", " ", tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ")).strip().lower()


def parse_tag_list(text: str | Iterable[str] | None) -> set[str]:
    """A user's exclude list (`"1girl, solo"` or a list) as comparison keys."""
    if not text:
        return set()
    items = split_tags(text) if isinstance(text, str) else [t for t in text if t and t.strip()]
    return {tag_key(t) for t in items}


def clean_caption(text: str) -> str:
    """One line, single spaces, no stray commas: what a generated caption should look like on disk."""
    text = re.sub(r"\s+", " ", text.replace("\r", " ").replace("\n", " ")).strip()
    text = re.sub(r"\s*,\s*(,\s*)*", ", ", text)
    return text.strip(" ,")


def insert_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first, the way training will (a tag that contains it moves to the front)."""
    if not trigger.strip():
        return caption
    return ", ".join(with_trigger(split_tags(caption), trigger))


def merge_caption(existing: str | None, new: str, mode: str) -> str | None:
    """Combine a freshly generated caption with the one the image already has.

    Returns None when the image must be left alone (`skip` and it already has a caption).
    `append`/`prepend` keep the existing text and add the new tags it does not already contain.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    existing = (existing or "").strip()
    if mode == "overwrite" or not existing:
        return new
    if mode == "skip":
        return None
    old_keys = {tag_key(t) for t in split_tags(existing)}
    extra = [t for t in split_tags(new) if tag_key(t) not in old_keys]
    if not extra:
        return existing
    parts = [existing, ", ".join(extra)] if mode == "append" else [", ".join(extra), existing]
    return ", ".join(parts)


def format_frequency(counts: Counter, top: int = 20, total: int | None = None) -> str:
    """Human summary of the most common tags, for the CLI and the node's text output."""
    if not counts:
        return "No tags."
    width = max(len(tag) for tag, _ in counts.most_common(top))
    head = f"Top {min(top, len(counts))} of {len(counts)} tags"
    head += f" over {total} captions:" if total is not None else ":"
    lines = [head]
    for tag, n in counts.most_common(top):
        share = f"  ({100 * n / total:.0f}%)" if total else ""
        lines.append(f"  {tag:<{width}}  {n:>5}{share}")
    return "\n".join(lines)
