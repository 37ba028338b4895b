"""When a Flux.1 training step with gradient checkpointing peaks in memory, and what is live then.

    python -m bench.flux_step_memory [--fp8] [--offload] [--batch 1] [--double 19 --single 38] [--side 128 --text 512]

A CPU tool (no GPU, no timing): it builds our Flux.1 (engine/models/flux_model.py) at full width on
PyTorch's `meta` device (shapes and dtypes, no data: the full 19 double + 38 single blocks cost
nothing), attaches the rank-16 network kohya's default preset makes (every Linear of both block kinds,
float32 master weights), and runs two real training steps as the engine runs them with checkpointing:
each LoRA weight cast to bf16 as its layer runs, `flux_forward(..., checkpoint=True)`, the loss,
backward, AdamW.
A `TorchDispatchMode` sees every tensor the second step makes and a weak reference to its storage
says when it dies, so the tool knows the live bytes after every op, the op at the peak, and what is
live then, split into: frozen weights, LoRA weights and optimizer states (there before the step), the
LoRA gradients, the checkpointed block inputs (forward outputs still
alive), what the block being recomputed keeps, the backward's gradients, fp8->bf16 weight casts and the
optimizer's temporaries, with the biggest tensors named by the line that made them.

Gradients of one tensor are summed in place where the autograd engine would (a dispatch mode makes
it copy). Attention runs as CUDA's flash kernel does it (output in [B, L, H, D] memory, a float32 logsumexp kept,
a float32 dq accumulator in backward), not as the meta device's math fallback. Not modelled: the CUDA
caching allocator's rounding and fragmentation, cuBLAS workspaces, the CUDA context (none of them in
torch.cuda.max_memory_allocated except the rounding), so the GPU peak is this plus a few hundred MiB.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2 ** 30
HERE = __file__.rsplit("/", 1)[-1]


def _origin() -> str:
    """The innermost engine line that made the tensor (backward: the autograd node running)."""
    f = sys._getframe(3)
    while f is not None:
        name = f.f_code.co_filename
        if "/engine/" in name and not name.endswith(HERE):
            return f"{name.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    node = torch._C._current_autograd_node()
    return f"autograd {node.name()}" if node is not None else "(torch)"


@dataclass
class Made:
    nbytes: int
    phase: str  # inputs / forward / recompute / backward / optimizer
    block: str
    origin: str
    op: str
    shape: tuple
    dtype: str


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages made under this mode; the peak and a snapshot of what was live then."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, Made] = {}
        self.now = self.peak = 0
        self.phase, self.block = "inputs", "-"
        self.at_peak: list[Made] = []
        self.peak_where = ""
        self.grads = lambda: set()  # storages of the LoRA gradients, asked at a new peak
        self.resident: set[int] = set()  # storages there before (weights, states): their views are not new
        self.paused = 0  # >0: host copies (cpu_offload_checkpointing), not device memory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add.Tensor and not kwargs and _engine_accumulates(*args):
            return args[0].add_(args[1])
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out

    def _track(self, t: torch.Tensor, func) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if self.paused or key in self.live or key in self.resident or not storage.nbytes():
            return
        phase = "backward" if self.phase == "step" and torch._C._current_autograd_node() is not None else self.phase
        self.live[key] = Made(storage.nbytes(), phase, self.block, _origin(), str(func.overloadpacket.__name__),
                              tuple(t.shape), str(t.dtype).replace("torch.", ""))
        self.now += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.now > self.peak:
            self.peak = self.now
            grads = self.grads()
            self.at_peak = [replace(m, phase="LoRA grad") if k in grads else m for k, m in self.live.items()]
            self.peak_where = f"{phase} {self.block}: {func} -> {tuple(t.shape)} {t.dtype} ({self.live[key].origin})"

    def _free(self, key: int) -> None:
        made = self.live.pop(key, None)
        if made is not None:
            self.now -= made.nbytes


def _engine_accumulates(a, b) -> bool:
    """True for the autograd engine summing two gradients of one tensor into a buffer it alone holds:
    without a dispatch mode it adds in place (`add_`); under any mode torch takes the out-of-place
    path, so the tool does the in-place add itself, as a run without the mode would."""
    if torch._C._current_autograd_node() is None or not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a._is_view() or not a.is_contiguous():
        return False
    if sys._getframe(2).f_code.co_filename.endswith(".py") and "/torch/" not in sys._getframe(2).f_code.co_filename:
        return False  # a Python backward's own sum (a custom Function), not the engine's
    return torch._C._storage_Use_Count(a.untyped_storage()._cdata) <= 2  # its tensor and this query


class FlashAttention(torch.autograd.Function):
    """What CUDA's flash attention allocates and keeps: output [B, L, H, D] in memory, float32 lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, n, d = q.shape
        out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # flash v2's dq accumulator
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accum
        return dq, dk, dv


def _flash(q, k, v, *args, **kwargs):
    return FlashAttention.apply(q, k, v)


# --- the model and the step -------------------------------------------------------------------------------

def build(double: int, single: int, fp8: bool, rank: int):
    from torch import nn

    from engine.config import TrainConfig
    from engine.lora.targets import build_network
    from engine.models.flux_adapter import FluxModel
    from engine.models.flux_model import FluxTransformer
    from engine.models.flux_tiny import FLUX1_DEV

    with torch.device("meta"):
        transformer = FluxTransformer(replace(FLUX1_DEV, depth=double, depth_single=single), dtype=torch.bfloat16)
        transformer.requires_grad_(False)
        if fp8:
            from engine.models.fp8 import store_in_fp8

            store_in_fp8(transformer)
        model = FluxModel(transformer, None, nn.Module(), nn.Module(), None, None, dtype=torch.bfloat16)
        network = build_network(model, TrainConfig(lora_rank=rank, lora_alpha=rank, target_modules="kohya"))
    params = [p for p in network.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)  # CUDA: fused, no temporaries
    return transformer, network, params, optimizer


def one_step(transformer, network, optimizer, side: int, text: int, tracker: LiveBytes | None, batch: int = 1):
    from engine.models import flux_forward as ff
    from engine.models import fp8

    def labelled(fn, kind):
        count = collections.Counter()

        def inner(*a, **k):
            if tracker is not None:
                again = torch._C._current_autograd_node() is not None
                previous = tracker.phase, tracker.block
                count[again] += 1
                tracker.phase, tracker.block = ("recompute" if again else "forward"), kind
            try:
                return fn(*a, **k)
            finally:
                if tracker is not None:
                    tracker.phase, tracker.block = previous
        return inner

    dev, dims = "meta", transformer.dims
    x = torch.empty(batch, 16, side, side, device=dev)
    target = torch.empty_like(x)
    sigma, guidance = torch.empty(batch, device=dev), torch.ones(batch, device=dev)
    context = torch.empty(batch, text, dims.context_in, device=dev, dtype=torch.bfloat16)
    pooled = torch.empty(batch, dims.vec_in, device=dev, dtype=torch.bfloat16)
    saved = ff.double_block, ff.single_block, F.scaled_dot_product_attention, fp8.output_dtype
    ff.double_block, ff.single_block = labelled(saved[0], "double"), labelled(saved[1], "single")
    F.scaled_dot_product_attention = _flash
    fp8.output_dtype = lambda x: x.dtype  # no autocast (the meta device has none; the step runs without)
    try:
        # with checkpointing the engine casts each LoRA weight as its layer runs (train.py: step_cast_dtype)
        with network.applied(), network.cast_weights(None):
            if tracker is not None:
                tracker.phase = "step"
            velocity = ff.flux_forward(transformer, x.to(torch.bfloat16), sigma, context, pooled, guidance,
                                       checkpoint=True)
            loss = F.mse_loss(velocity.float(), target)
            loss.backward()
            del velocity, loss
        if tracker is not None:
            tracker.phase, tracker.block = "optimizer", "-"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        ff.double_block, ff.single_block, F.scaled_dot_product_attention, fp8.output_dtype = saved


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in tensors}.values())


@contextlib.contextmanager
def _host_copies(tracker: LiveBytes | None):
    """cpu_offload_checkpointing on the meta device: the block inputs' host copies are not counted, their
    return to the device is (a new tensor, as the host-to-device copy makes)."""
    from engine.models import flux_offload

    init, restore = flux_offload._Held.__init__, flux_offload._Held.restore

    def held(self, t):
        if tracker is not None:
            tracker.paused += 1
        try:
            init(self, t)
        finally:
            if tracker is not None:
                tracker.paused -= 1

    flux_offload._Held.__init__ = held
    flux_offload._Held.restore = lambda self: self.host.clone().requires_grad_(self.requires_grad)
    try:
        with flux_offload.offload_checkpointing(True):
            yield
    finally:
        flux_offload._Held.__init__, flux_offload._Held.restore = init, restore


def measure(double=19, single=38, fp8=False, side=128, text=512, rank=16, batch=1, offload=False):
    """(resident before the step: {part: bytes}, the tracker after the second step)."""
    transformer, network, params, optimizer = build(double, single, fp8, rank)
    with _host_copies(None) if offload else contextlib.nullcontext():
        one_step(transformer, network, optimizer, side, text, None, batch)  # the optimizer's states exist from here
    weights = list(transformer.parameters()) + list(transformer.buffers())
    resident = {"frozen weights": _bytes(weights), "LoRA weights (fp32)": _bytes(params),
                "optimizer states": _bytes([t for s in optimizer.state.values() for t in s.values()
                                            if isinstance(t, torch.Tensor) and t.dim()])}
    tracker = LiveBytes()
    tracker.resident = {t.untyped_storage()._cdata for t in weights + params}
    tracker.resident |= {t.untyped_storage()._cdata for s in optimizer.state.values() for t in s.values()
                         if isinstance(t, torch.Tensor)}
    tracker.grads = lambda: {p.grad.untyped_storage()._cdata for p in params if p.grad is not None}
    with tracker, _host_copies(tracker) if offload else contextlib.nullcontext():
        one_step(transformer, network, optimizer, side, text, tracker, batch)
    return resident, tracker


def _part(m: Made) -> str:
    if m.phase == "LoRA grad":
        return "LoRA grads (fp32, accumulated)"
    if "fp8.py" in m.origin and m.op == "_to_copy":
        return "fp8 -> bf16 weight casts"
    if m.phase == "inputs":
        return "the step's inputs (latents, text, draws)"
    if m.phase == "forward":
        return "checkpointed block inputs (forward outputs)"
    if m.phase == "step":  # made outside the blocks: the first blocks' inputs, the final layer's
        return "forward outside the blocks"
    if m.phase == "recompute":
        return f"recomputed {m.block} block: kept for its backward"
    return m.phase if m.phase != "backward" else "backward gradients / temporaries"


def report(resident: dict, tracker: LiveBytes, top: int = 12) -> float:
    parts = collections.Counter()
    for m in tracker.at_peak:
        parts[_part(m)] += m.nbytes
    total = sum(resident.values()) + tracker.peak
    print(f"  peak {total / GIB:.2f} GiB at: {tracker.peak_where}")
    for name, n in list(resident.items()) + parts.most_common():
        print(f"    {n / GIB:7.3f} GiB  {name}")
    biggest = collections.Counter()
    for m in tracker.at_peak:
        if m.phase not in ("forward", "inputs", "LoRA grad"):
            biggest[(_part(m), m.origin, m.op, m.shape, m.dtype)] += m.nbytes
    print("  biggest tensors live at the peak (outside the checkpointed inputs):")
    for (part, origin, op, shape, dtype), n in biggest.most_common(top):
        print(f"    {n / 2**20:8.1f} MiB  {dtype:8s} {str(list(shape)):22s} {op:22s} {origin}  [{part}]")
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--double", type=int, default=19)
    p.add_argument("--single", type=int, default=38)
    p.add_argument("--side", type=int, default=128, help="latent side (1024 px: 128 -> 4096 image tokens)")
    p.add_argument("--text", type=int, default=512, help="T5 tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fp8", action="store_true", help="fp8_base: Linear weights stored in float8")
    p.add_argument("--offload", action="store_true", help="cpu_offload_checkpointing")
    args = p.parse_args(argv)
    print(f"== ours{'-fp8' if args.fp8 else ''}{' +cpu_offload_checkpointing' if args.offload else ''}: "
          f"{args.double} double + {args.single} single blocks, batch {args.batch} x "
          f"{(args.side // 2) ** 2}+{args.text} tokens, rank {args.rank}, checkpointing on")
    report(*measure(args.double, args.single, args.fp8, args.side, args.text, args.rank, args.batch, args.offload))


if __name__ == "__main__":
    main()
