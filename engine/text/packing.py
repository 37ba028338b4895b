"""Encoded samples -> rows of `max_length` tokens, the held-out split, and the order rows are trained in.

Packing puts whole samples into rows (best fit, longest first), so a row is nearly all real tokens and
no sample is cut across rows. Each sample in a row attends only to itself: positions restart at every
sample and the attention is causal within it (transformers does the same from the restarting
positions; the lean forward builds the same mask), so packing changes the speed, not what is learned.
Labels are shifted here, on the host: `targets[i]` is the token the model must predict after position
i, or -100 where nothing is trained (a sample's last token, untrained tokens, padding).
Samples longer than `max_length` follow `long_samples`; every one is named in the warnings.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import DatasetError
from .tokenize import IGNORE, Encoded


@dataclass
class Long:
    where: str
    tokens: int


@dataclass
class Fitted:
    """Samples after the long-sample policy, with what it did."""

    samples: list[Encoded]
    long: list[Long] = field(default_factory=list)
    dropped_untrained: list[str] = field(default_factory=list)


def fit(encoded: list[Encoded], chat: list[bool], max_length: int, policy: str) -> Fitted:
    """Apply `long_samples` (truncate, split, drop, error) to samples longer than max_length."""
    out = Fitted([])
    for sample, is_chat in zip(encoded, chat):
        pieces = [sample]
        if len(sample) > max_length:
            out.long.append(Long(sample.where, len(sample)))
            if policy == "drop":
                continue
            if policy == "split" and not is_chat:
                pieces = [Encoded(sample.ids[i:i + max_length], [False] + sample.trained[i + 1:i + max_length],
                                  f"{sample.where} part {i // max_length + 1}")
                          for i in range(0, len(sample), max_length)]
            else:
                pieces = [Encoded(sample.ids[:max_length], sample.trained[:max_length], sample.where)]
        for piece in pieces:
            if any(piece.trained[1:]) and len(piece) > 1:
                out.samples.append(piece)
            else:
                out.dropped_untrained.append(piece.where)
    if policy == "error" and out.long:
        raise DatasetError(f"{len(out.long)} samples are longer than max_length {max_length} tokens: "
                           f"{describe_long(out.long)}. Raise max_length, or set long_samples: truncate, split "
                           f"or drop.")
    return out


def describe_long(long: list[Long], limit: int = 5) -> str:
    shown = ", ".join(f"{x.where} ({x.tokens} tokens)" for x in sorted(long, key=lambda x: -x.tokens)[:limit])
    return shown + (f" and {len(long) - limit} more" if len(long) > limit else "")


def split_heldout(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) sample indices: `share` of them (a ratio below 1, or a count), at least one
    held out when asked and possible, at least one left to train on."""
    if share <= 0 or n < 2:
        return list(range(n)), []
    count = int(share) if share >= 1 else max(1, round(share * n))
    count = min(count, n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[count:]), sorted(order[:count])


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            left, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (left - lengths[i], row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
    return rows


def collate(samples: list[Encoded], rows: list[list[int]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples as tensors [B, length]: input_ids, targets (shifted, -100 = not trained),
    position_ids (restarting at every sample) and segments (which sample of its row a token is, 0 = pad)."""
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    targets = torch.full((b, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    segments = torch.zeros((b, length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, index in enumerate(row, start=1):
            n = len(samples[index])
            ids[r, at:at + n], targets[r, at:at + n] = samples[index].tensors()
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = k
            at += n
        positions[r, at:] = torch.arange(length - at)
    return {"input_ids": ids, "targets": targets, "position_ids": positions, "segments": segments}


def needs_mask(batch: dict[str, torch.Tensor]) -> bool:
    """Whether some row holds two or more samples (then attention must keep them apart). Padding at a
    row's end needs no mask: causal attention never lets a real token see a later one."""
    return bool((batch["segments"].amax(dim=1) > 1).any())


@dataclass
class RowPlan:
    """Rows for one split and the order they are trained in."""

    samples: list[Encoded]
    rows: list[list[int]]
    length: int  # tokens per row (max_length when packing, else the longest sample)
    pad_id: int
    batch_size: int
    seed: int = 0
    packed: bool = True  # rows are max_length long; else each row is one sample, padded to its batch's longest

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(s.trained[1:]) for s in self.samples)

    @property
    def fill(self) -> float:
        return self.tokens / max(1, len(self.rows) * self.length)

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Row indices of every batch of an epoch, shuffled by (seed, epoch): the same on a resume."""
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batch(self, row_indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in row_indices]
        length = self.length if self.packed else max(sum(len(self.samples[i]) for i in r) for r in rows)
        batch = collate(self.samples, rows, length, self.pad_id)
        batch["masked"] = needs_mask(batch)
        return batch

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        """Every row once, in order (for evaluation)."""
        return [self.batch(list(range(i, min(i + self.batch_size, len(self.rows)))))
                for i in range(0, len(self.rows), self.batch_size)]


def plan_rows(samples: list[Encoded], *, max_length: int, packing: bool, pad_id: int, batch_size: int,
              seed: int) -> RowPlan:
    if packing:
        rows = pack([len(s) for s in samples], max_length)
        return RowPlan(samples, rows, max_length, pad_id, batch_size, seed, packed=True)
    return RowPlan(samples, [[i] for i in range(len(samples))], max((len(s) for s in samples), default=1),
                   pad_id, batch_size, seed, packed=False)
