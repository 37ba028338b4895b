"""Give back what a failed (out-of-memory) call held: the tensors only its frames referred to are
collected, and the CUDA caching allocator's free blocks returned, so the next try starts from the
memory the run holds, not from the failed call's leftovers (fragments included)."""

from __future__ import annotations

import gc

import torch


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
