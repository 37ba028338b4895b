"""kohya sd-scripts' batch order for our trainer, inside the bench process only (issue 19).

Given the same draws kohya's step ends where ours does (tests/engine/test_quality_kohya_step.py), so one
candidate left for kohya reaching the stripes concept sooner is the order of its batches. kohya's dataset
is a list of whole batches (DataLoader batch 1, shuffled); it regroups its pictures into batches only when
the collator, called after an item is fetched, sees a new epoch number. With the bench's kohya run
(`--max_data_loader_n_workers 0`, so no persistent workers) an epoch of B batches therefore trains on one
batch of the previous epoch's grouping first, then on B - 1 batches of its own new grouping (the one batch
left out is a random one of them). The very first grouping is made when the dataset is built, before
the run's seed reaches it (kohya seeds it with 0), so step 1 draws from the same grouping for every seed.
Ours forms a fresh grouping every epoch (engine/data/plan.py), and keeps doing so: the engine has no
such setting. `--batch-order kohya` (bench/quality.py) swaps `TrainData.epoch_plan` for this structure
while the bench runs, built from the engine's own groupings:

    epoch e = [grouping(e - 1)[j], grouping(e)[1], ..., grouping(e)[B - 1]]

with grouping(e) the engine's epoch-e plan (batches already in random order, so leaving out the first
is leaving out a random one), grouping(-1) a seed-independent one, and j drawn per (seed, epoch). From
the second epoch on, epoch e's first batch is one epoch e - 1 trained on in 2 cases of 3 (for 3 batches
an epoch), the one just before it in 1 of 3. Which pictures land together is not kohya's (other random
numbers); the structure is. The validation split's plan (engine/validation.py) would change with it
too; the bench's runs have none.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import replace

ORDERS = ("ours", "kohya")
FIRST_GROUPING_SEED = 0  # kohya's make_buckets shuffles before set_seed, with its dataset's seed still 0


def kohya_epoch(grouping, epoch: int, seed: int) -> list:
    """Epoch `epoch`'s batches in kohya's order; `grouping(e)` is epoch e's fresh plan (-1: the first one)."""
    previous, current = grouping(epoch - 1), grouping(epoch)
    first = previous[random.Random(f"{seed}:{epoch}:kohya-first").randrange(len(previous))]
    return [replace(p, epoch=epoch, index=i) for i, p in enumerate([first, *current[1:]])]


@contextmanager
def batch_order(order: str):
    """While open, our trainer (every `TrainData` in this process) batches in `order`: "ours" leaves the
    engine alone, "kohya" gives it kohya's structure (module docstring)."""
    if order not in ORDERS:
        raise ValueError(f"batch order {order!r}: one of {', '.join(ORDERS)}")
    if order == "ours":
        yield
        return
    from engine.data.plan import epoch_batches
    from engine.data.train_data import TrainData

    own = TrainData.epoch_plan

    def kohya_plan(self, epoch: int, batch_size: int | None = None):
        def grouping(e: int):
            if e >= 0:
                return own(self, e, batch_size)
            return epoch_batches(self.samples, lambda r: self.placements[r].bucket,
                                 batch_size or self.cfg.batch_size, FIRST_GROUPING_SEED, -1)
        return kohya_epoch(grouping, epoch, self.cfg.seed)

    TrainData.epoch_plan = kohya_plan
    try:
        yield
    finally:
        TrainData.epoch_plan = own
