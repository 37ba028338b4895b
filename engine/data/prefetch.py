"""The next batch's host work (image decoding, crops, disk-cache reads) in a thread while the GPU trains.

Without latent caching every step decodes and crops its images on the CPU; done in line, the GPU
waits for it each step. `Prefetch` runs `TrainData.gather` for the following batch in one worker
thread as soon as the current one is handed out. Every random choice of a batch is seeded by
(seed, epoch, slot), so a batch gathered ahead is the batch the loop would have gathered itself.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class Prefetch:
    def __init__(self, data, *, enabled: bool):
        self.data = data
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lora-prefetch") if enabled else None
        self.pending: tuple[int, int, Future] | None = None

    def get(self, plan, epoch: int, index: int):
        """The host half of batch `index` of `epoch` (gathered ahead when it was asked for)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[:2] == (epoch, index):
            return pending[2].result()
        if pending is not None:
            pending[2].cancel()
        return self.data.gather(plan[index], epoch=epoch)

    def ahead(self, plan, epoch: int, index: int) -> None:
        """Start gathering batch `index` of `epoch` (`plan` is that epoch's plan)."""
        if self.pool is not None:
            self.pending = (epoch, index, self.pool.submit(self.data.gather, plan[index], epoch=epoch))

    def close(self) -> None:
        if self.pool is not None:
            if self.pending is not None:
                self.pending[2].cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
