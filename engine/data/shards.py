"""A process's part of the dataset when several processes train one LoRA (engine/distributed.py).

The epoch plan is the one a single process with batch `batch_size x processes` would make (the same
buckets, the same shuffle, the same batches), and every global batch is split between the processes in
rank order: sizes differ by at most one, so a bucket's short last batch is shared too. Over an epoch
each sample lands on exactly one process, none twice and none skipped. A global batch smaller than the
number of processes leaves some with no sample: those run one sample of the batch with weight 0, so
every process still takes part in the all-reduce and the sum is unchanged.

Caching runs once: the encoder jobs (VAE batches per bucket, caption batches) are dealt out round-robin,
each process encodes its share, and the results are shared: through the disk cache (`cache_latents:
disk`), or sent to every process (memory caches), so each process can train on any sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .plan import BatchPlan


@dataclass(frozen=True)
class Share:
    """This process's slice of a global batch: samples [offset, offset + count) of `total`."""

    offset: int
    count: int
    total: int

    @property
    def weight(self) -> float:
        """The slice's part of the batch mean: the loss and gradients are scaled by it, then summed."""
        return self.count / self.total

    def draw(self, objective, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The global batch's draws (every process draws them all, from the same generator state) and
        this slice of them: the noise and timesteps one process with the whole batch would use."""
        whole = x0[:1].expand(self.total, *x0.shape[1:])
        drawn = objective.draw(whole, generator)
        return {k: v[self.offset:self.offset + x0.shape[0]] for k, v in drawn.items()}


def split(total: int, world: int) -> list[tuple[int, int]]:
    """(offset, count) of each rank's slice of `total` samples: in rank order, sizes differ by at most one."""
    base, extra = divmod(total, world)
    out, offset = [], 0
    for rank in range(world):
        count = base + (rank < extra)
        out.append((offset, count))
        offset += count
    return out


def shard_plan(plan: BatchPlan, rank: int, world: int) -> BatchPlan:
    """The rank's part of one global batch (one sample with weight 0 where the batch has none left for it)."""
    offset, count = split(len(plan.samples), world)[rank]
    if count == 0:
        return replace(plan, samples=plan.samples[:1], share=Share(0, 0, len(plan.samples)))
    return replace(plan, samples=plan.samples[offset:offset + count], share=Share(offset, count, len(plan.samples)))


class ShardedData:
    """TrainData as one process of several sees it; everything else (read or set) is TrainData's."""

    _OWN = ("_data", "dist", "rank", "world", "global_batch")

    def __init__(self, data, dist):
        self._data, self.dist = data, dist
        self.rank, self.world = dist.rank, dist.world
        self.global_batch = data.cfg.batch_size * dist.world

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __setattr__(self, name, value):  # the run sets step_encode_precision: TrainData's batches read it
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._data, name, value)

    def batches_per_epoch(self) -> int:
        return self._data.batches_per_epoch(self.global_batch)

    def epoch_plan(self, epoch: int) -> list[BatchPlan]:
        return [shard_plan(p, self.rank, self.world) for p in self._data.epoch_plan(epoch, self.global_batch)]

    @torch.no_grad()
    def prepare_cache(self, model, *, progress=None) -> None:
        """Each encoder job runs on one process, in rounds of one job per process; after each round every
        process holds (or reads from the disk cache) its results. A round's exchange is one VAE batch
        per process, so the memory it takes does not grow with the dataset."""
        jobs = self._data.cache_jobs()
        self.dist.barrier()  # every process has listed what is missing before anyone writes to the disk cache
        starts = range(0, len(jobs), self.world)
        for n, start in enumerate(starts, 1):
            mine = jobs[start + self.rank:start + self.rank + 1]
            self._data.run_cache_jobs(model, mine)
            for rank, entries in enumerate(self.dist.gather(self._data.cache_entries(mine))):
                if rank != self.rank:  # the gather also waits until every disk entry is written
                    self._data.add_cache_entries(entries)
            if progress is not None:
                progress(n, len(starts))
