"""Several GPUs: `accelerate launch --num_processes N -m engine train ...` (or torchrun).

The N processes train one LoRA as one process would with batch N x batch_size: every step's global
batch (one bucket, from the same epoch plan) is split between the processes (engine/data/shards.py),
each draws the noise and timesteps of the whole global batch from the same seeded generator and keeps
its slice, and the LoRA gradients, each weighted by the process's share of the batch, are summed
before each update (together with the loss, in one flattened all-reduce after the backward: rank 16 on
kohya's layers is 26 MiB of float32 gradients for SD1.5 and 162 MiB for SDXL, well under a millisecond
over NVLink against steps of a quarter to one second at batch 8, so overlapping it with the backward
would gain next to nothing; it lives outside the CUDA graph, which several processes therefore do not
use yet). So every process holds the same LoRA, and the loss curve is the one-process curve up to float32
summation order. The frozen base model is not wrapped in DDP at all.

Only the first process writes files and talks to the console, and nothing it writes waits on the
others. When a process dies, the others' next all-reduce fails at once (gloo: the connection resets;
under torchrun/accelerate the launcher also sends SIGTERM to the survivors), they end with a message
that says how to resume, and each survivor leaves the checkpoint of the last finished step (they all
hold the same state). With one process all of this is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading

import torch
import torch.distributed as dist

from .errors import TrainingStopped, UserError

RESUME_HINT = ("resume with resume_from_checkpoint: latest, on any number of processes (keep batch_size x "
               "processes the same)")


class ProcessLost(UserError):
    """Another process of a several-GPU run stopped; this one ends too, with a checkpoint (`checkpoint`,
    set once it is written, is named in the message)."""

    checkpoint: str | None = None

    def __str__(self) -> str:
        return super().__str__() + (f" The checkpoint: {self.checkpoint}" if self.checkpoint else "")


class Distributed:
    def __init__(self, timeout_minutes: float = 0):
        """`timeout_minutes` (the config's ddp_timeout; 0: 30): how long a collective waits for a hung
        (not dead) process."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes or 30))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, default: torch.device) -> torch.device:
        if self.enabled and default.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return default

    # --- collectives -----------------------------------------------------------------------------------
    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, ConnectionError) as exc:  # gloo: connection reset; NCCL: DistBackendError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
            raise ProcessLost(f"process {self.rank} of {self.world}: another process of this run stopped during "
                              f"{what} ({first}). This process ends too; {RESUME_HINT}.") from exc

    def reduce_step(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum every process's (share-weighted) LoRA gradients and loss; the summed loss comes back.
        One flattened all-reduce (see the module docstring for why not bucketed)."""
        if not self.enabled:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else loss.device
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float().to(device)])
        self._collective("the gradient all-reduce", lambda: dist.all_reduce(flat))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1].to(loss.device, loss.dtype)

    def gather(self, obj):
        """Every process's `obj`, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        self._collective("an exchange between processes", lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self) -> None:
        if self.enabled:
            self._collective("a barrier", dist.barrier)

    # --- run settings ----------------------------------------------------------------------------------
    def run_settings(self, cfg_dict: dict) -> dict:
        """The config as a checkpoint records it: batch_size is the global batch (per process x processes),
        so a run resumes on another number of processes where the global batch stays the same."""
        return {**cfg_dict, "batch_size": int(cfg_dict["batch_size"]) * self.world, "processes": self.world}

    @contextlib.contextmanager
    def stop_on_sigterm(self):
        """torchrun/accelerate stop the other processes with SIGTERM when one fails: end as a stop (with
        a checkpoint), not killed mid-write. Only with several processes, only from the main thread."""
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum, frame):
            raise TrainingStopped(f"process {self.rank} of {self.world} stopped by the launcher (SIGTERM: another "
                                  f"process failed or the job was cancelled); {RESUME_HINT}")

        before = signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, before)
