"""Per-step caption processing (trigger word, tag shuffling, caption and tag dropout) and seeded RNGs.

Every random choice in the data pipeline comes from `sample_rng(seed, epoch, slot, purpose)`: a
private generator derived from the run's seed, the epoch and the sample's fixed slot in the epoch.
Nothing touches the global RNGs, so a run resumed mid-epoch sees exactly the captions, flips and crops
it would have seen, and changing one option (say flips) does not reshuffle another (the captions).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter


def sample_rng(seed: int, epoch: int, slot: int, purpose: str) -> random.Random:
    """A generator that depends only on its arguments (string seeds are hashed with SHA-512)."""
    return random.Random(f"{seed}:{epoch}:{slot}:{purpose}")


def stable_int(*parts) -> int:
    """A 63-bit integer from the parts, the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def per_step_caption_change(cfg, train_text_encoder: bool) -> str:
    """Why a caption's text conditioning cannot be cached ("" when it can): a trained text encoder, or
    captions that change every step."""
    return ("the text encoder is trained" if train_text_encoder else
            "shuffle_caption changes captions every step" if cfg.shuffle_caption else
            "caption_tag_dropout_rate changes captions every step" if cfg.caption_tag_dropout_rate else "")


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def _contains_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def with_trigger(tags: list[str], trigger: str) -> list[str]:
    """Tags with the trigger first: an existing tag that is (or contains) the trigger moves to the front,
    otherwise the trigger is inserted."""
    trigger = trigger.strip()
    if not trigger:
        return tags
    for i, tag in enumerate(tags):
        if tag.lower() == trigger.lower():
            return [tag] + tags[:i] + tags[i + 1:]
    for i, tag in enumerate(tags):
        if _contains_word(tag, trigger):
            return [tag] + tags[:i] + tags[i + 1:]
    return [trigger] + tags


def process_caption(caption: str, rng: random.Random, *, trigger_word: str = "", shuffle: bool = False,
                    keep_tokens: int = 0, dropout: float = 0.0, tag_dropout: float = 0.0,
                    drop_all: bool = False) -> str:
    """The caption a step trains on.

    Dropout (probability `dropout`, or `drop_all`: kohya's caption_dropout_every_n_epochs) gives "" — the
    unconditional caption, trigger included, as kohya does. Otherwise the trigger word is first; the
    comma-separated tags after the first `keep_tokens` (counted with the trigger, and never fewer than the
    trigger itself) are shuffled with `shuffle`, and each is then dropped with probability `tag_dropout`
    (kohya's caption_tag_dropout_rate: kept tokens and the trigger are never dropped).
    """
    # Draw the dropout coin first and always, so shuffling on/off does not change which steps drop.
    dropped = rng.random() < dropout if dropout > 0 else False
    if dropped or drop_all:
        return ""
    if not trigger_word.strip() and not shuffle and not tag_dropout:
        return caption.strip()
    tags = with_trigger(split_tags(caption), trigger_word)
    if shuffle or tag_dropout:
        fixed = max(keep_tokens, 1 if trigger_word.strip() else 0)
        head, tail = tags[:fixed], tags[fixed:]
        if shuffle:
            rng.shuffle(tail)
        if tag_dropout:  # after the shuffle, as kohya: one coin per tag
            tail = [t for t in tail if rng.random() >= tag_dropout]
        tags = head + tail
    return ", ".join(tags)


def fixed_caption(caption: str, *, trigger_word: str = "") -> str:
    """What process_caption returns when nothing random is on (used to fill the text-encoder cache)."""
    return process_caption(caption, random.Random(0), trigger_word=trigger_word)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Lower-cased tag counts over captions (kohya's ss_tag_frequency, one dict per folder)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(t.lower() for t in split_tags(caption))
    return dict(counts.most_common())
