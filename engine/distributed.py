"""Several GPUs: `accelerate launch --num_processes N -m engine train ...` (or torchrun).

Each process trains on its own share of every epoch's batches and the LoRA gradients are averaged
before each update, so every process holds the same LoRA. A LoRA's gradients are a few MB, so one
flattened all-reduce per update costs little; the frozen base model is not wrapped in DDP at all.
Only the first process writes files and talks to the console. With one process this is all a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Distributed:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, default: torch.device) -> torch.device:
        if self.enabled and default.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return default

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather(self, obj):
        """Every process's `obj`, in rank order (only meaningful on the main process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class ShardedData:
    """A process's share of the dataset: batches rank, rank + N, ... of every epoch's plan, the same
    count on every process (a remainder of fewer than N batches is left out of that epoch)."""

    def __init__(self, data, rank: int, world: int):
        self._data, self.rank, self.world = data, rank, world

    def __getattr__(self, name):
        return getattr(self._data, name)

    def batches_per_epoch(self) -> int:
        per = self._data.batches_per_epoch() // self.world
        if per == 0:
            from .errors import ConfigError

            raise ConfigError(f"{self.world} processes need at least {self.world} batches per epoch; lower "
                              f"batch_size or use fewer GPUs.")
        return per

    def epoch_plan(self, epoch: int):
        plan = self._data.epoch_plan(epoch)
        return plan[self.rank::self.world][: self.batches_per_epoch()]
