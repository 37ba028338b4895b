"""Stall watchdog: a step far slower than the run's usual step is reported, with what it waited for.

A hung data loader (a network drive, an image that takes minutes to decode) and a device that slowed
down (GPU memory spilling into shared system memory, as Windows' sysmem fallback does; another
process on the GPU; thermal throttling) look the same from outside: the progress bar stops. Each
optimizer step is timed from its first micro-batch to its loss read-back (previews and checkpoint
saves excluded), with the time spent getting batches apart; a step over `factor` x the running median
of the last `window` steps and over `min_seconds` emits an info event saying which it was. The first
`warmup` steps (CUDA-graph capture, torch.compile, caches warming) are not judged.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from typing import Callable


class StallWatchdog:
    def __init__(self, say: Callable[[str], None], *, clock: Callable[[], float] | None = None,
                 factor: float = 10.0, min_seconds: float = 30.0, window: int = 50, warmup: int = 2,
                 compiling: bool = False):
        self.say, self.clock = say, clock or time.monotonic
        self.factor, self.min_seconds, self.warmup = factor, min_seconds, warmup
        self.times: deque[float] = deque(maxlen=window)
        self.seen = 0
        self.compiling = compiling  # torch.compile compiles each new bucket shape: a slow step that is no stall
        self.reports: list[str] = []
        self._t0 = self._data = 0.0

    def start(self) -> None:
        """A new optimizer step begins (its first micro-batch)."""
        self._t0, self._data = self.clock(), 0.0

    @contextlib.contextmanager
    def loading(self):
        """Around getting a batch: time spent waiting for data."""
        t = self.clock()
        try:
            yield
        finally:
            self._data += self.clock() - t

    def end(self, step: int) -> str | None:
        """The step is done (its loss read back where it was); returns the report when it stalled."""
        took = self.clock() - self._t0
        self.seen += 1
        report = None
        if self.seen > self.warmup and len(self.times) >= 3:
            usual = statistics.median(self.times)
            if took > self.min_seconds and took > self.factor * usual:
                report = self._report(step, took, usual)
        if self.seen > self.warmup:
            self.times.append(took)
        return report

    def _report(self, step: int, took: float, usual: float) -> str:
        data = self._data
        if data >= 0.5 * took:
            what = (f"it waited {data:.0f} s for its images (the data loader: a slow or network drive, a very "
                    f"large or broken image, or the CPU busy elsewhere)")
        else:
            what = (f"the device took {took - data:.0f} s (GPU memory spilling into shared system memory, "
                    f"e.g. Windows' sysmem fallback: lower batch size or resolution, or turn on gradient "
                    f"checkpointing; another program using the GPU; or thermal throttling)")
            if self.compiling:
                what += "; or torch.compile compiling a new bucket shape"
        text = f"step {step} took {took:.0f} s, {took / usual:.0f}x the usual {usual:.1f} s: {what}"
        self.reports.append(text)
        self.say(text)
        return text
