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
backward, so `lean_saves` is only used without it (checkpointing has its own saved-tensor hooks).
"""

from __future__ import annotations

import contextlib
import weakref

import torch


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
            dx = (rrms * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_scale = (grad * normed.to(x.dtype)).reshape(-1, scale.shape[-1]).sum(0).to(scale.dtype)
        return dx, d_scale, None


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _RMSNorm.apply(x, scale, eps)


# --- recomputed instead of kept ------------------------------------------------------------------------

class _Recipes:
    """The tensors marked by `recomputed` while a `lean_saves` context is open: storage address ->
    (weak reference to the tensor, the function that makes it again)."""

    def __init__(self):
        self.by_storage: dict[int, tuple[weakref.ref, object]] = {}

    def pack(self, t):
        entry = self.by_storage.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
        if entry is not None:
            ref, make = entry
            original = ref()
            if original is not None and original.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                return (_Recipe, make, tuple(t.shape), t.stride(), t.storage_offset(), original.storage_offset())
        return t

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple) and packed and packed[0] is _Recipe:
            _, make, shape, stride, offset, base_offset = packed
            with torch.no_grad():
                full = make()
            return full.as_strided(shape, stride, full.storage_offset() + offset - base_offset)
        return packed


class _Recipe:  # a marker: this saved entry is a recipe, not a tensor
    pass


_active: list[_Recipes] = []


@contextlib.contextmanager
def lean_saves(enabled: bool = True):
    """Around a block's forward: tensors marked by `recomputed` inside are kept as their recipes."""
    if not enabled:
        yield
        return
    recipes = _Recipes()
    _active.append(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            yield
    finally:
        _active.pop()


def recomputed(t: torch.Tensor, make) -> torch.Tensor:
    """Mark `t` (just made by `make()`, a function of tensors that backward keeps anyway) so that a node
    saving it for backward inside `lean_saves` keeps `make` instead. Without an open context, a no-op."""
    if _active and torch.is_grad_enabled() and t.is_contiguous():
        _active[-1].by_storage[t.untyped_storage().data_ptr()] = (weakref.ref(t), make)
    return t
