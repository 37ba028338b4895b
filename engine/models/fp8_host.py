"""A host's fp8 Linear layers keep their fp8 weight for backward, not the compute-dtype copy.

ComfyUI's casting Linears (comfy.ops manual_cast, what a UNet or Flux loaded with weight_dtype fp8_e4m3fn runs)
cast the stored fp8 weight to the input's dtype on every call and hand the copy to F.linear, so
autograd keeps one bf16 copy per layer until backward: without checkpointing, the whole model again
in bf16 (engine/models/fp8.py says the same of autocast). For the duration of a run each such layer
gets an instance `forward` computing the same product through `cast_linear`, whose backward casts the
fp8 weight again. The host's tensors are read, never written, and the instance attribute is removed
on exit (also after an exception): the model comes back bit-identical, its class untouched.

Taken over: a frozen comfy.ops Linear with a 1-byte float weight on the device, without weight or
bias patch functions (ComfyUI's lowvram LoRA hooks) and with no scale or a scalar `scale_weight`,
the same layers `fp8_compute` knows the product of. A call without grad (previews sample as the host
does), with a patch added later, with extra arguments or with the weight elsewhere (offloaded) runs
the host's own forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .fp8 import cast_linear
from .fp8_compute import _comfy_scale, _comfy_unpatched
from .module_state import instance_forwards


def takes_over(layer: nn.Module) -> bool:
    """A host Linear whose cast copy this module can spare (see the module doc)."""
    if not isinstance(layer, nn.Linear) or "forward" in layer.__dict__ or not _comfy_unpatched(layer):
        return False
    w, b = layer.weight, layer.bias
    if type(w) not in (nn.Parameter, torch.Tensor) or not w.is_floating_point() or w.element_size() != 1:
        return False
    return not w.requires_grad and not (b is not None and b.requires_grad) and _comfy_scale(layer) is not False


@contextlib.contextmanager
def host_fp8_casts(root: nn.Module | None):
    """For the duration, `root`'s fp8 host Linears keep only their fp8 weight for backward; yields how
    many layers were taken over."""
    layers = [m for m in root.modules() if takes_over(m)] if root is not None else []

    def take(mod):
        scale = _comfy_scale(mod)

        def forward(x, *args, _own=mod.forward, **kwargs):
            if (args or kwargs or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor)
                    or mod.weight_function or mod.bias_function or mod.weight.device != x.device):
                return _own(x, *args, **kwargs)
            return cast_linear(x, mod.weight, mod.bias, scale)

        forward.casts_fp8 = True  # fp8_compute may take such a layer over in turn
        return forward

    with instance_forwards(layers, take) as n:
        yield n
