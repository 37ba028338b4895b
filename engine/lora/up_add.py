"""Add a Linear LoRA's up projection onto its base layer's output in place.

`torch.addmm(out, h, up.t())` first copies `out` into a new tensor and then accumulates the GEMM onto
the copy: four passes over the base layer's output, which for rank 16 is nearly all of the work (the
GEMM itself is thin). `out.addmm_(h, up.t())` makes two. On an H100 at SDXL batch 8 this takes
ff.net.0.proj's up projection from 291 to 180 us and a 640-wide attention projection's from 74 to
23 us (`python -m bench.lora_gemms`).

The base output belongs to the hook that receives it (nothing else has seen it, and the base layer's
backward needs its input, not its output), so writing into it is safe. Autograd must not see the
write as an in-place op on a view, though: F.linear with a bias returns a view of a 2-D result, and
an in-place op on a view makes autograd copy the whole gradient twice in backward (CopySlices). So
`AddUpInPlace` writes into the view's base, which is a plain tensor, and declares it dirty; its
backward computes what autograd's addmm backward computes, in the same order, so values and
gradients are bit-identical to the copying form.
"""

from __future__ import annotations

import torch


class AddUpInPlace(torch.autograd.Function):
    """`target.view(-1, n) += scale * h @ up.t()`, writing into `target`; returns `target`."""

    @staticmethod
    def forward(ctx, target: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        target.view(-1, up.shape[0]).addmm_(h, up.t(), alpha=scale)
        ctx.mark_dirty(target)
        ctx.save_for_backward(h, up)
        ctx.scale = scale
        return target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, up = ctx.saved_tensors
        grad2d = grad.reshape(-1, up.shape[0])
        d_h = d_up = None
        if ctx.needs_input_grad[1]:  # addmm's mat1 backward: grad @ mat2.t(), then alpha
            d_h = _times(grad2d.mm(up), ctx.scale)
        if ctx.needs_input_grad[2]:  # mat2 (= up.t(), column-major) backward: (grad.t() @ h).t(), then alpha
            d_up = _times(grad2d.t().mm(h), ctx.scale)
        return grad, d_h, d_up, None


# torch.compiler.is_compiling arrived in torch 2.3; A1111 still ships 2.1, which compiles nothing of ours
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _times(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1 else t * scale


def owned_base(output: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor holding `output`'s values, when `output` is that tensor or a reshape of all of
    it (F.linear with a bias returns such a view); None for any other layout."""
    base = output if output._base is None else output._base
    if (not output.is_contiguous() or not base.is_contiguous() or base.numel() != output.numel()
            or base.data_ptr() != output.data_ptr() or base._base is not None):
        return None
    return base


def add_up(output: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float, in_place: bool) -> torch.Tensor:
    """`output + scale * h @ up.t()` over the last dimension (`h` is `[..., rank]`, `up` `[out, rank]`):
    in place when the caller owns `output` (`in_place`) and its layout allows it (see the module doc),
    else with the copying addmm. Not in place under torch.compile, which plans its own buffers."""
    n, r = output.shape[-1], h.shape[-1]
    base = owned_base(output) if in_place and not _compiling() else None
    if base is None:
        return torch.addmm(output.reshape(-1, n), h.reshape(-1, r), up.t(), alpha=scale).view(output.shape)
    if not torch.is_grad_enabled():
        base.view(-1, n).addmm_(h.reshape(-1, r), up.t(), alpha=scale)
        return output
    return AddUpInPlace.apply(base, h.reshape(-1, r), up, scale).view(output.shape)
