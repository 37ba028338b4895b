"""The training and held-out rows of a text run, built once and shared by `check` and `train`.

Files are read (sources.py), every sample is tokenized (tokenize.py), the held-out samples are set
aside (a share of the samples, or `eval_data`), samples past `max_length` follow `long_samples`, and
the rest are packed into rows (packing.py). What happened on the way (empty records skipped, long
samples, chat turns cut away) is kept as warnings, each naming where in the data it happened.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from .packing import Fitted, RowPlan, describe_long, fit, plan_rows, split_heldout
from .sources import Samples, read_samples
from .tokenize import Encoder, resolve_chat_template


@dataclass
class TextData:
    train: RowPlan
    heldout: RowPlan | None
    chat: bool  # the training data has chat samples: sample prompts are wrapped in the chat template
    template_changed: bool
    files: list[Path]
    samples: int  # samples read (train + held out)
    fitted: Fitted
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """A fingerprint of the training rows: a resume must continue the same data."""
        h = hashlib.sha256()
        for row in self.train.rows:
            for i in row:
                h.update(str(self.train.samples[i].ids).encode())
            h.update(b"|")
        return h.hexdigest()[:16]


def build_data(cfg, tokenizer) -> TextData:
    template, changed = resolve_chat_template(tokenizer, cfg.chat_template)
    if changed:
        tokenizer.chat_template = template  # what generation uses, and saved with the adapter
    encoder = Encoder(tokenizer, template)
    read = read_samples(cfg.train_data, text_column=cfg.text_column, text_split=cfg.text_split)
    if cfg.eval_data:
        held = read_samples(cfg.eval_data, text_column=cfg.text_column, text_split=cfg.text_split)
        train_samples, held_samples = read.samples, held.samples
        skipped = read.skipped + held.skipped
    else:
        train_idx, held_idx = split_heldout(len(read.samples), cfg.eval_split, cfg.seed)
        train_samples = [read.samples[i] for i in train_idx]
        held_samples = [read.samples[i] for i in held_idx]
        skipped = read.skipped
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fitted = fit([encoder.encode(s) for s in train_samples], [s.is_chat for s in train_samples],
                 cfg.max_length, cfg.long_samples)
    if not fitted.samples:
        raise DatasetError(f"nothing left to train on in '{cfg.train_data}': every sample was longer than "
                           f"max_length {cfg.max_length} ({describe_long(fitted.long)}) or had no trained tokens. "
                           f"Raise max_length or set long_samples: truncate.")
    train = plan_rows(fitted.samples, max_length=cfg.max_length, packing=cfg.packing, pad_id=pad,
                      batch_size=cfg.batch_size, seed=cfg.seed)
    heldout = None
    if held_samples:
        held_fit = fit([encoder.encode(s) for s in held_samples], [s.is_chat for s in held_samples],
                       cfg.max_length, "truncate" if cfg.long_samples == "error" else cfg.long_samples)
        if held_fit.samples:
            heldout = plan_rows(held_fit.samples, max_length=cfg.max_length, packing=cfg.packing, pad_id=pad,
                                batch_size=cfg.batch_size, seed=cfg.seed)
    data = TextData(train, heldout, any(s.is_chat for s in train_samples), changed,
                    read.files, len(train_samples) + len(held_samples), fitted, skipped)
    data.warnings = _warnings(cfg, data, read)
    return data


def _warnings(cfg, data: TextData, read: Samples) -> list[str]:
    out = list(read.notes)
    long = data.fitted.long
    if long:
        did = {"truncate": "cut at max_length (the end is not trained)", "split": "split into max_length pieces "
               "(chats are cut at max_length)", "drop": "left out", "error": ""}[cfg.long_samples]
        out.append(f"{len(long)} samples are longer than max_length {cfg.max_length} tokens and were {did}: "
                   f"{describe_long(long)}. Raise max_length to keep them whole.")
    if data.fitted.dropped_untrained:
        gone = data.fitted.dropped_untrained
        out.append(f"{len(gone)} samples have nothing left to train on after cutting at max_length (e.g. a chat "
                   f"whose assistant turn starts past it) and were left out: {', '.join(gone[:3])}"
                   f"{' ...' if len(gone) > 3 else ''}.")
    if data.skipped:
        out.append(f"{len(data.skipped)} empty records (or chats without an assistant turn) were skipped: "
                   f"{', '.join(data.skipped[:3])}{' ...' if len(data.skipped) > 3 else ''}.")
    if data.heldout is None and (cfg.eval_split > 0 or cfg.eval_data):
        out.append("no held-out samples (the data has fewer than 2 samples): perplexity is not measured.")
    return out


def text_data_from(samples: list, cfg, pad_id: int = 0) -> TextData:
    """TextData from already tokenized samples (Encoded), nothing held out: for runs on generated tokens."""
    fitted = fit(samples, [False] * len(samples), cfg.max_length, cfg.long_samples)
    train = plan_rows(fitted.samples, max_length=cfg.max_length, packing=cfg.packing, pad_id=pad_id,
                      batch_size=cfg.batch_size, seed=cfg.seed)
    return TextData(train, None, False, False, [], len(samples), fitted)
