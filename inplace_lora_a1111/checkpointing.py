"""Gradient checkpointing for A1111's ldm (SD1/SD2) and sgm (SDXL) UNet blocks.

A1111 turns the blocks' own checkpointing off (`repair_config`), and its `sd_hijack_checkpoint` uses
reentrant checkpointing, which drops the gradients of LoRA weights inside a block whose input does
not require grad (UNet-only training). ldm/sgm's `CheckpointFunction` would drop them too (it only
differentiates the parameters it is given). So each `BasicTransformerBlock` / `ResBlock` gets a
per-instance `forward` that runs the block's `_forward` under `torch.utils.checkpoint` with
`use_reentrant=False`; deleting the instance attribute afterwards restores the class method, so no
other loaded model (and no other extension's class patch) is touched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

BLOCK_TYPES = ("BasicTransformerBlock", "ResBlock")


def _checkpointed(inner):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # previews and caching: nothing to save memory for
            return inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def block_checkpointing(root: nn.Module):
    """Checkpoint every ldm/sgm transformer and residual block under `root`; yields how many."""
    patched = []
    try:
        for module in root.modules():
            if (type(module).__name__ in BLOCK_TYPES and callable(getattr(module, "_forward", None))
                    and "forward" not in module.__dict__):
                module.forward = _checkpointed(module._forward)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
