"""Frozen UNet weights stored in float8 (kohya's `--fp8_base`): half the memory of bf16 weights.

Every Linear and Conv2d weight of the denoiser becomes float8_e4m3fn by a plain cast, as kohya's
`--fp8_base` and ComfyUI's `fp8_e4m3fn` weight dtype store them (no scales). Biases, norms, the first
and the last convolution keep the compute dtype: the outer layers are the most precision-sensitive, and
diffusers reads a model's dtype from its first parameter. Only for a model the engine loaded itself: a
host's weights are never converted.

Each converted layer casts its weight to the compute dtype as it runs (autocast's dtype where autocast
is on, else the input's) through `CastLinear`/`CastConv2d`: autograd Functions that keep only the fp8
weight for backward and cast it again there for the input gradient. Casting through autocast instead
(what a plain Linear with an fp8 weight needs) makes autograd keep each layer's compute-dtype copy
until backward: without gradient checkpointing that is every weight again in bf16 (fp8 used more memory
than bf16), with it the copies of the block being recomputed. The frozen weight has no gradient, so
the cast is all backward needs. With the layers casting themselves an fp8 model whose other weights are
bf16 runs natively in bf16 like a bf16 model (`TrainableModel.computes_in` skips these fp8 weights),
without autocast's float32 norm and softmax activations: its peak is the bf16 peak less the weight bytes
fp8 saves (plus one layer's cast at a time).

The layers keep their class's state-dict keys, `isinstance(layer, nn.Linear)` and forward hooks (the LoRA
hooks add onto their output, engine/lora/network.py); `fp8_compute` takes them over like plain Linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
KEEP = ("conv_in", "conv_out")  # first and last layer: stay in the compute dtype
_DEVICE_AUTOCAST_API = hasattr(torch, "get_autocast_dtype")


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear returns for `x`: autocast's where it is on, else x's. (No try/except here:
    torch.compile traces this on every layer, and a graph break per layer is slow.)"""
    kind = x.device.type
    if _DEVICE_AUTOCAST_API:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    if kind == "cuda":  # torch < 2.4: the CUDA and CPU forms without arguments
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else x.dtype
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else x.dtype


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """The stored weight in `dtype`, times ComfyUI's `scale_weight` where the layer has one."""
    w = weight.to(dtype)
    return w if scale is None else w * scale.to(dtype)


class CastLinear(torch.autograd.Function):
    """`x @ cast(W).t() + b` for a frozen W and a 2-D x: backward keeps W as stored (already resident),
    not its cast."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, cast_weight(weight, x.dtype, scale), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad.mm(cast_weight(weight, grad.dtype, scale)), None, None, None


class CastConv2d(torch.autograd.Function):
    """conv2d with a frozen weight cast per call; backward keeps the stored weight and the input's shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.args = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = torch.nn.grad.conv2d_input(ctx.shape, weight.to(grad.dtype), grad, *ctx.args)
        return dx, None, None, None, None, None, None


def cast_linear(x: torch.Tensor, weight, bias, scale=None) -> torch.Tensor:
    """A frozen Linear's output for `x`, its weight cast to the compute dtype for the product only."""
    dtype = output_dtype(x)
    flat = x if x.dtype == dtype else x.to(dtype)
    if flat.dim() != 2:  # a 2-D x is used as it is: no view whose gradient autograd could not sum in place
        flat = flat.reshape(-1, x.shape[-1])
    out = CastLinear.apply(flat, weight, bias, scale)
    # the Function's output is a plain 2-D tensor: LoRA's in-place add writes into it through the
    # view (engine/lora/up_add.py); a view made inside the Function would cut the gradient there
    return out.view(*x.shape[:-1], out.shape[-1])


class Fp8BaseLinear(nn.Linear):
    """A Linear whose frozen weight is stored in fp8 (the class `store_in_fp8` gives converted layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast_linear(x, self.weight, self.bias)


class Fp8BaseConv2d(nn.Conv2d):
    """A Conv2d whose frozen weight is stored in fp8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = output_dtype(x)
        x = x if x.dtype == dtype else x.to(dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        elif isinstance(padding, str):  # "same"/"valid": the plain conv works out the numbers
            return F.conv2d(x, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype),
                            self.stride, padding, self.dilation, self.groups)
        return CastConv2d.apply(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


_CLASSES = {nn.Linear: Fp8BaseLinear, nn.Conv2d: Fp8BaseConv2d}


def store_in_fp8(unet: nn.Module) -> tuple[int, int]:
    """Convert the UNet's Linear/Conv2d weights in place; returns (bytes before, bytes after)."""
    before = after = 0
    for name, layer in unet.named_modules():
        if type(layer) not in _CLASSES or name in KEEP:
            continue
        weight = layer.weight
        if not weight.is_floating_point() or weight.dtype == FP8:
            continue
        before += weight.numel() * weight.element_size()
        layer.weight = nn.Parameter(weight.detach().to(FP8), requires_grad=False)
        layer.__class__ = _CLASSES[type(layer)]  # same module, a forward that casts its weight itself
        after += weight.numel()
    return before, after


def casts_itself(module: nn.Module) -> bool:
    """A layer `store_in_fp8` converted: its weight's dtype is not the dtype it computes in."""
    return isinstance(module, (Fp8BaseLinear, Fp8BaseConv2d))


def holds_fp8(module: nn.Module) -> bool:
    """True when some weight of `module` is stored in fp8."""
    return any(p.dtype == FP8 for p in module.parameters())
