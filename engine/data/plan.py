"""Which samples an epoch holds and in which batches, as a pure function of (seed, epoch).

An epoch is a fixed multiset of samples: every training image `repeats` times, plus as many
regularisation samples as there are training samples (kohya: reg images are cycled until their count
matches). Each sample has a fixed `slot`, the key of its per-step randomness. An epoch's batches are
formed per bucket (all images of a batch share a size), shuffled with a generator seeded by
(seed, epoch) and never the global RNG, so the loop resumes mid-epoch by skipping the first k batches.
The multiset is the same every epoch, so the number of batches per epoch is a constant.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    record: int  # index into TrainData.records
    slot: int  # fixed position in the epoch's sample list: seeds this sample's crop/flip/caption


@dataclass(frozen=True)
class BatchPlan:
    """One step's worth of samples, all in `bucket` (width, height)."""

    epoch: int
    index: int  # position within the epoch
    bucket: tuple[int, int]
    samples: tuple[Sample, ...]
    share: Any = None  # several processes: this process's shards.Share of the global batch

    def __len__(self) -> int:
        return len(self.samples)


def cycle_reg(reg: list[tuple[int, int]], target: int, seed: int) -> list[int]:
    """Record indices of `target` regularisation samples from [(record, repeats)], kohya-style.

    The first pass takes each image with its repeats; later passes add one of each in turn until the
    count reaches the number of training samples. Image order is shuffled by the seed so that, when
    there are more reg images than needed, the ones used are not just the alphabetically first.
    """
    if not reg or target <= 0:
        return []
    order = list(reg)
    random.Random(f"{seed}:reg-order").shuffle(order)
    picked: list[int] = []
    for record, repeats in order:
        picked.extend([record] * repeats)
        if len(picked) >= target:
            return picked[:target]
    while len(picked) < target:
        for record, _ in order:
            picked.append(record)
            if len(picked) >= target:
                break
    return picked


def build_samples(train: list[tuple[int, int]], reg: list[tuple[int, int]], seed: int) -> list[Sample]:
    """The epoch's samples: train records x repeats, then the cycled reg samples; slots 0..N-1."""
    records = [r for r, repeats in train for _ in range(repeats)]
    records += cycle_reg(reg, len(records), seed)
    return [Sample(record, slot) for slot, record in enumerate(records)]


def _by_bucket(samples: list[Sample], bucket_of) -> dict[tuple[int, int], list[Sample]]:
    groups: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[bucket_of(s.record)].append(s)
    return dict(sorted(groups.items()))


def count_batches(samples: list[Sample], bucket_of, batch_size: int) -> int:
    return sum(math.ceil(len(g) / batch_size) for g in _by_bucket(samples, bucket_of).values())


def epoch_batches(samples: list[Sample], bucket_of, batch_size: int, seed: int, epoch: int) -> list[BatchPlan]:
    """Shuffle within buckets, cut into batches (a bucket's last batch may be short), shuffle batches."""
    rng = random.Random(f"{seed}:{epoch}:order")
    chunks: list[tuple[tuple[int, int], tuple[Sample, ...]]] = []
    for bucket, group in _by_bucket(samples, bucket_of).items():
        group = list(group)
        rng.shuffle(group)
        chunks += [(bucket, tuple(group[i:i + batch_size])) for i in range(0, len(group), batch_size)]
    rng.shuffle(chunks)
    return [BatchPlan(epoch, i, bucket, batch) for i, (bucket, batch) in enumerate(chunks)]
