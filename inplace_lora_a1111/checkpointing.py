"""Gradient checkpointing for A1111's ldm (SD1/SD2) and sgm (SDXL) UNet blocks.

A1111 turns the blocks' own checkpointing off (`repair_config`), and its `sd_hijack_checkpoint` uses
reentrant checkpointing, which drops the gradients of LoRA weights inside a block whose input does
not require grad (UNet-only training). ldm/sgm's `CheckpointFunction` would drop them too (it only
differentiates the parameters it is given). So each `BasicTransformerBlock` / `ResBlock` gets a
per-instance `forward` that runs the block's `_forward` under `torch.utils.checkpoint` with
`use_reentrant=False`; deleting the instance attribute afterwards restores the class method, so no
other loaded model (and no other extension's class patch) is touched.

A `SpatialTransformer` with a single block (all of SD1's and SD2's) is recomputed whole instead, as
the engine does for diffusers' transformers (`one_block_transformer` in engine/models/module_state.py
says why); its block runs its `_forward` plainly inside that recompute. SDXL's 2- and 10-block
transformers keep block-by-block checkpointing.
"""

from __future__ import annotations

import contextlib

from torch import nn

from engine.models.module_state import checkpointed_forwards, one_block_transformer

BLOCK_TYPES = ("BasicTransformerBlock", "ResBlock")


def _free(module: nn.Module) -> bool:
    """Not already given an instance `forward` (by another extension, or by us)."""
    return "forward" not in module.__dict__


def _ldm_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_TYPES and callable(getattr(module, "_forward", None)) and _free(module)


def _whole(module: nn.Module) -> bool:
    return type(module).__name__ == "SpatialTransformer" and one_block_transformer(module) and _free(module)


@contextlib.contextmanager
def block_checkpointing(root: nn.Module):
    """Checkpoint every ldm/sgm transformer and residual block under `root`; yields how many modules
    are recomputed (whole transformers and blocks)."""
    whole = [m for m in root.modules() if _whole(m)]
    inside = {id(b) for m in whole for b in m.transformer_blocks}
    blocks = [m for m in root.modules() if _ldm_block(m) and id(m) not in inside]
    plain = [b for w in whole for b in w.transformer_blocks if _ldm_block(b)]
    with checkpointed_forwards(whole), checkpointed_forwards(blocks, inner="_forward"), \
            checkpointed_forwards(plain, inner="_forward", recompute=False):
        yield len(whole) + len(blocks)
