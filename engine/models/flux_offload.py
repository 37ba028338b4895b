"""kohya's `cpu_offload_checkpointing`: checkpointed Flux blocks keep their inputs in host memory.

With gradient checkpointing a block keeps nothing for backward but its inputs; at Flux.1's 1024 px
those are 4608 tokens x 3072 bf16 (27 MiB) per block, 1.45 GiB over the 57 blocks, the largest part of
a checkpointed step's peak after the weights (`python -m bench.flux_step_memory`). Here each block's
token tensors are copied to pinned host memory right after the block starts (on a side stream, so the
copy overlaps the block's own compute), and the GPU copy is freed as soon as the forward has moved on;
when backward recomputes the block its inputs come back from host memory. Backward recomputes the
blocks in the reverse of their forward order, so while one block is recomputed and differentiated the
inputs of the block before it are copied back on the side stream (one block's inputs ahead, 27 MiB an
image at 1024 px): the copies overlap compute instead of stalling it (about 1 ms a block, 57 a step).
The values are the same bytes, so the gradients are bit-identical to plain checkpointing.

The small per-step tensors (the modulation vector, the rotary table shared by all blocks) stay where
they are. On the CPU the "host copy" is a clone (tests exercise the same path).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

_switched_on = [False]  # TrainConfig.cpu_offload_checkpointing, for the duration of a run


@contextlib.contextmanager
def offload_checkpointing(on: bool):
    """For the duration of a run: whether checkpointed Flux blocks keep their inputs in host memory."""
    _switched_on.append(bool(on))
    try:
        yield
    finally:
        _switched_on.pop()


def offloading() -> bool:
    return _switched_on[-1]


class _Held:
    """One block input in host memory: the copy, whether it required grad, the device to return to,
    (CUDA) the event that says the device-to-host copy has finished, and once prefetched the device copy
    on its way back with the event that says it has arrived (`prefetched`: whether the last restore used it)."""

    __slots__ = ("host", "requires_grad", "device", "done", "ready", "ready_event", "prefetched")

    def __init__(self, t: torch.Tensor):
        self.requires_grad, self.device, self.done = t.requires_grad, t.device, None
        self.ready, self.ready_event, self.prefetched = None, None, False
        if t.device.type != "cuda":
            self.host = t.detach().clone()
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        side = _side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t is written
        with torch.cuda.stream(side):
            self.host.copy_(t.detach(), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(side)
        t.record_stream(side)  # the allocator keeps t's memory until the copy has read it

    def prefetch(self) -> None:
        """Start copying back to the device on the side stream (CUDA), ahead of `restore`."""
        if self.ready is not None:
            return
        if self.device.type != "cuda":
            self.ready = self.host.clone()
            return
        side = _side_stream(self.device)
        if self.done is not None:
            side.wait_event(self.done)
        with torch.cuda.stream(side):
            self.ready = self.host.to(self.device, non_blocking=True)
            self.ready_event = torch.cuda.Event()
            self.ready_event.record(side)

    def restore(self) -> torch.Tensor:
        t, self.ready = self.ready, None
        self.prefetched = t is not None
        if t is None:  # not prefetched: the first block backward reaches
            if self.done is not None:
                torch.cuda.current_stream(self.device).wait_event(self.done)
            t = self.host.to(self.device, non_blocking=True)
        elif self.ready_event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready_event)
            t.record_stream(current)  # made on the side stream, used and freed on this one
        return t.requires_grad_(self.requires_grad) if self.requires_grad else t


class _Block:
    """The held inputs of one checkpointed block, and a weak link to the block before it in the same
    forward, whose inputs backward needs next."""

    __slots__ = ("held", "previous", "restored", "__weakref__")

    def __init__(self, held: list[_Held]):
        self.held, self.restored = held, False
        before = _last[0]() if _last[0] is not None else None
        self.previous = weakref.ref(before) if before is not None and not before.restored else None
        _last[0] = weakref.ref(self)

    def restore(self) -> None:
        """Called as backward recomputes this block: start bringing back the previous block's inputs."""
        self.restored = True
        before = self.previous() if self.previous is not None else None
        if before is not None and not before.restored:
            for h in before.held:
                h.prefetch()


_last: list = [None]  # weak reference to the block whose inputs were held last


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device):
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def offloaded_checkpoint(fn, offload: int, *args):
    """`checkpoint(fn, *args)` (non-reentrant) with the first `offload` arguments kept in host memory
    between the forward and the recomputation. The forward itself runs on the arguments as they are
    (no round trip); only the recomputation reads the host copies."""
    first = list(args)  # dropped after the forward, so the device copies are freed with it
    held = tuple(_Held(a) if i < offload and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    block = _Block([h for h in held if isinstance(h, _Held)])

    def run(*stored):
        if first:
            inputs = tuple(first)
            first.clear()
            return fn(*inputs)
        inputs = tuple(s.restore() if isinstance(s, _Held) else s for s in stored)
        block.restore()
        return fn(*inputs)

    return _checkpoint(run, *held, use_reentrant=False)
