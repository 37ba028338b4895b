"""What Flux's forward keeps for backward: no float32 copies, and cheap tensors recomputed instead of kept.

Without gradient checkpointing, autograd keeps every tensor a backward formula needs until the backward
pass reaches it; at 1024 px (4608 tokens x 57 blocks) each byte per token per block is 0.25 GiB. Written
plainly, Flux's forward keeps far more than it needs (issue 16; `python -m bench.flux_saved_bytes`
counts it per block kind):

- the q/k RMSNorm, as BFL writes it (`x.float()` twice), keeps two float32 copies of q and of k:
  16 bytes per token per unit of width, more than attention itself. `rms_norm` here computes the same
  values (the same ops in the same order) in one autograd node that keeps the bf16 input and the
  float32 reciprocal RMS (one number per head and token), and derives the gradient from them.
- a LoRA's down projection keeps its layer's input for the down weight's gradient, and the frozen base
  layer needs none; several of those inputs are cheap to make again from tensors that other nodes keep
  anyway: the GELU's output (the MLP's second Linear, 4 widths wide; in single blocks the
  attention+MLP concatenation of 5 widths) from the GELU's input, which the GELU keeps. `recomputed`
  marks such a tensor with how to make it again, and `lean_saves()` (a `saved_tensors_hooks` context
  around a block's forward) keeps that recipe instead of the tensor: the recipe holds only tensors
  already kept, and its result in backward is bit-identical (the same ops on the same inputs).

Under gradient checkpointing the blocks are recomputed whole and keep nothing between forward and
backward, so `lean_saves` is only used without it (checkpointing has its own saved-tensor hooks); under
torch.compile it does nothing (inductor chooses what to recompute itself, and traces no Python hooks).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from ..lora.up_add import _compiling


class _RMSNorm(torch.autograd.Function):
    """BFL's RMSNorm, `(x.float() * rrms).to(x.dtype) * scale`, keeping x (its dtype) and rrms only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rrms, scale)
        return (xf * rrms).to(x.dtype) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rrms, scale = ctx.saved_tensors
        dx = d_scale = None
        normed = x.float() * rrms
        if ctx.needs_input_grad[0]:
            g = (grad * scale.to(grad.dtype)).float()  # the bf16 product autograd forms, then the upcast
            # rrms * (g - normed * mean(g * normed)), written into g: the same values, two float32
            # q-sized temporaries fewer (a checkpointed Flux step peaks in this backward)
            g.sub_(normed * (g * normed).mean(-1, keepdim=True))
            dx = g.mul_(rrms).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_scale = (grad * normed.to(x.dtype)).reshape(-1, scale.shape[-1]).sum(0).to(scale.dtype)
        return dx, d_scale, None


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _RMSNorm.apply(x, scale, eps)


# --- recomputed instead of kept ------------------------------------------------------------------------

class _Recipe:
    """`fn(*args)` remakes a tensor; an arg is a tensor backward keeps anyway, another _Recipe (a marked
    tensor made from marked tensors: their recipes are kept, not they), or a plain value. `autocast`:
    (device type, dtype) of the autocast the tensor was made under, None for none; backward runs outside
    it, so the recipe enters it again (a LayerNorm under CUDA autocast computes in float32)."""

    __slots__ = ("fn", "args", "autocast")

    def __init__(self, fn, args, autocast):
        self.fn, self.args, self.autocast = fn, args, autocast

    def make(self) -> torch.Tensor:
        args = [a.make() if isinstance(a, _Recipe) else a for a in self.args]
        if self.autocast is None:
            return self.fn(*args)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return self.fn(*args)

    def tensors(self):
        """The tensors this recipe keeps (for counting)."""
        for a in self.args:
            if isinstance(a, _Recipe):
                yield from a.tensors()
            elif isinstance(a, torch.Tensor):
                yield a


class _Saved:
    """A saved view of a marked tensor: its recipe and where the view sits in it."""

    __slots__ = ("recipe", "shape", "stride", "offset")

    def __init__(self, recipe, shape, stride, offset):
        self.recipe, self.shape, self.stride, self.offset = recipe, shape, stride, offset


class _Recipes:
    """The tensors marked by `recomputed` while a `lean_saves` context is open: storage address ->
    (weak reference to the tensor, fn, args)."""

    def __init__(self):
        self.by_storage: dict[int, tuple[weakref.ref, object, tuple, tuple | None]] = {}

    def _marked(self, t):
        if type(t) is not torch.Tensor:  # weights (Parameters), tensor subclasses
            return None
        ptr = t.untyped_storage().data_ptr()
        entry = self.by_storage.get(ptr)
        if entry is None:
            return None
        original = entry[0]()  # alive, so its storage is this one (a dead one's address may be reused)
        if original is None or original.untyped_storage().data_ptr() != ptr:
            return None
        return original, entry[1:]

    def _recipe(self, fn, args, autocast) -> _Recipe:
        resolved = []
        for a in args:
            marked = self._marked(a) if isinstance(a, torch.Tensor) else None
            # a marked argument is used whole (recomputed() takes only whole, contiguous tensors)
            resolved.append(self._recipe(*marked[1]) if marked is not None and marked[0] is a else a)
        return _Recipe(fn, tuple(resolved), autocast)

    def pack(self, t):
        if not self.by_storage:
            return t
        marked = self._marked(t)
        if marked is None:
            return t
        original, how = marked
        return _Saved(self._recipe(*how), tuple(t.shape), t.stride(), t.storage_offset() - original.storage_offset())

    @staticmethod
    def unpack(packed):
        if isinstance(packed, _Saved):
            with torch.no_grad():
                full = packed.recipe.make()
            return full.as_strided(packed.shape, packed.stride, full.storage_offset() + packed.offset)
        return packed


_active: list[_Recipes] = []
_switched_on = [True]  # EngineOptions.lean_flux (bench: the ours-flux-keep-all tool turns it off)


@contextlib.contextmanager
def lean_flux(on: bool):
    """For the duration of a run: whether `lean_saves` keeps recipes (on) or every tensor (off)."""
    _switched_on.append(bool(on))
    try:
        yield
    finally:
        _switched_on.pop()


@contextlib.contextmanager
def lean_saves(enabled: bool = True):
    """Around a block's forward: tensors marked by `recomputed` inside are kept as their recipes."""
    if not enabled or not _switched_on[-1] or _compiling():
        yield
        return
    recipes = _Recipes()
    _active.append(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            yield
    finally:
        _active.pop()


def recomputed(t: torch.Tensor, fn, *args) -> torch.Tensor:
    """Mark `t`, just made as `fn(*args)` from tensors backward keeps anyway (or from marked tensors),
    so that a node saving it for backward inside `lean_saves` keeps the recipe instead. `fn` must make
    it again bit for bit (the same ops in the same order). Without an open context, a no-op."""
    if _active and torch.is_grad_enabled() and type(t) is torch.Tensor and t.is_contiguous() and not _compiling():
        autocast = _autocast_state(t.device.type)
        if autocast is False:
            return t
        _active[-1].by_storage[t.untyped_storage().data_ptr()] = (weakref.ref(t), fn, args, autocast)
    return t


def _autocast_state(device: str):
    """(device, dtype) of the autocast on for `device`, None when off; False where this torch (< 2.4,
    A1111's) cannot say by device and some autocast is on: then nothing is marked."""
    if hasattr(torch, "get_autocast_dtype"):
        return (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
    return False if torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled() else None
