"""GEGLU feed-forwards that hold half as much for backward, with the same numbers.

Every SD UNet block ends in `x, gate = proj(h).chunk(2); x * gelu(gate)` (diffusers', ComfyUI's and
ldm's GEGLU alike). Autograd keeps the projection (through the two chunks) and `gelu(gate)` for
backward: 1.5x the projection per block, the largest activation a block holds. `LeanGEGLU` keeps the
projection only and recomputes `gelu(gate)` in backward, one elementwise pass over half of it; its
backward also writes both halves of the gradient into one buffer, so the chunk needs no `cat`. The
forward runs the same operations as the hosts' (bit-identical output) and so do the gradients.

Training without checkpointing gains the most (a third less GEGLU activation in every block); with
checkpointing a block's activations only live while it is recomputed, so it matters less there.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .module_state import instance_forwards


class LeanGEGLU(torch.autograd.Function):
    """`x * gelu(gate)` of a projection's two halves, holding only the projection for backward."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        x, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return x * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        x, gate = projected.chunk(2, dim=-1)
        out = torch.empty_like(projected)
        d_x, d_gate = out.chunk(2, dim=-1)
        torch.mul(grad, F.gelu(gate), out=d_x)
        torch.ops.aten.gelu_backward.grad_input(grad * x, gate, grad_input=d_gate)
        return out


def is_geglu(mod: nn.Module) -> bool:
    """A GEGLU of the shape every SD host uses: a class named GEGLU with a Linear `proj` of even width
    and no per-instance forward (which would mean someone else already patched it)."""
    proj = getattr(mod, "proj", None)
    return (type(mod).__name__ == "GEGLU" and isinstance(proj, nn.Linear) and proj.out_features % 2 == 0
            and "forward" not in mod.__dict__)


@contextlib.contextmanager
def lean_geglu(root: nn.Module | None):
    """Route every GEGLU under `root` through `LeanGEGLU` while grad is enabled (previews and other
    no-grad calls run the module's own forward); the instance `forward` is removed afterwards, so the
    host's module comes back as it was. `proj` is still called as a module, so LoRA hooks and a host's
    own Linear (ComfyUI's weight casting, A1111's Lora patches) apply as before."""
    patched = [m for m in root.modules() if is_geglu(m)] if root is not None else []

    def lean(mod):
        def forward(hidden_states, *args, _own=mod.forward, **kwargs):
            if args or kwargs or not torch.is_grad_enabled():
                return _own(hidden_states, *args, **kwargs)
            return LeanGEGLU.apply(mod.proj(hidden_states))

        return forward

    with instance_forwards(patched, lean) as n:
        yield n
