"""Frozen UNet weights stored in float8 (kohya's `--fp8_base`): half the memory of bf16 weights.

Every Linear and Conv2d weight of the denoiser becomes float8_e4m3fn by a plain cast, as kohya's
`--fp8_base` and ComfyUI's `fp8_e4m3fn` weight dtype store them (no scales). Biases, norms, the first
and the last convolution keep the compute dtype: the outer layers are the most precision-sensitive, and
diffusers reads a model's dtype from its first parameter. Autocast casts each fp8 weight to the compute
dtype as its layer runs (linear and conv2d are on its lower-precision list), so the step needs nothing
else; `TrainableModel.computes_in` sees the fp8 weights and keeps autocast on. The saving is real with
gradient checkpointing: without it, backward keeps each layer's compute-dtype copy of its weight.
Only for a model the engine loaded itself: a host's weights are never converted.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
KEEP = ("conv_in", "conv_out")  # first and last layer: stay in the compute dtype


def store_in_fp8(unet: nn.Module) -> tuple[int, int]:
    """Convert the UNet's Linear/Conv2d weights in place; returns (bytes before, bytes after)."""
    before = after = 0
    for name, layer in unet.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or name in KEEP:
            continue
        weight = layer.weight
        if not weight.is_floating_point() or weight.dtype == FP8:
            continue
        before += weight.numel() * weight.element_size()
        layer.weight = nn.Parameter(weight.detach().to(FP8), requires_grad=False)
        after += weight.numel()
    return before, after


def holds_fp8(module: nn.Module) -> bool:
    """True when some weight of `module` is stored in fp8 (it then runs only under autocast)."""
    return any(p.dtype == FP8 for p in module.parameters())
