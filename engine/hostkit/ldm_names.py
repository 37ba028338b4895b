"""LDM/sgm UNet names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`) -> the names the SD families'
rules read, for every host that keeps SD UNets in the LDM layout: ComfyUI, A1111 and Forge.

The block layout that maps one naming onto the other comes from what the host has: ComfyUI's (and
Forge's) `unet_config` dict (the one `comfy.utils.unet_to_diffusers` reads), or, where the host has
no such config (A1111), the module names the loaded UNet really has: downsamplers
(`input_blocks.N.0.op`) mark the levels, and a `.1.proj_in` / `.1.transformer_blocks` child marks a
block with attention. Pure torch: no host import.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from ..errors import ModelError
from ..families import supported_text
from ..families.unet import UNetLayout, diffusers_to_ldm, ldm_to_diffusers

_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.")
_OP = re.compile(r"^input_blocks\.(\d+)\.0\.op$")
_ATTN = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(proj_in|transformer_blocks)\b")


def layout_from_ldm_names(names: Iterable[str], fallback: UNetLayout) -> UNetLayout:
    """Derive the layout from `diffusion_model.named_modules()` names; `fallback` if they do not look
    like an LDM UNet."""
    names = list(names)
    ops = sorted(int(m[1]) for m in map(_OP.match, names) if m)
    if not ops:
        return fallback
    per = ops[0]  # resnets per level + the downsampler slot: the first op sits at index lpb + 1
    lpb, levels = per - 1, len(ops) + 1
    if lpb < 1 or any(op != per * (i + 1) for i, op in enumerate(ops)):
        return fallback
    attn_in, attn_out = set(), set()
    for m in map(_ATTN.match, names):
        if m:
            (attn_in if m[1] == "input_blocks" else attn_out).add(int(m[2]))
    down = tuple(any(1 + level * per + i in attn_in for i in range(lpb)) for level in range(levels))
    up = tuple(any(level * per + i in attn_out for i in range(per)) for level in range(levels))
    mid = any(n.startswith(("middle_block.1.proj_in", "middle_block.1.transformer_blocks")) for n in names)
    return UNetLayout(down_attn=down, up_attn=up, layers_per_block=lpb, mid_attn=mid)


def layout_from_unet_config(unet_config: dict) -> UNetLayout:
    """The diffusers block layout of a ComfyUI `UNetModel` config (SD1/SD2/SDXL and their variants).

    `transformer_depth` has one entry per input res block; `transformer_depth_output` is consumed
    from its end by the output blocks (`.pop()` in ComfyUI's UNetModel), so up block 0 reads the tail.
    """
    nrb = unet_config.get("num_res_blocks")
    if nrb is None:
        raise ModelError("this model has no UNet (num_res_blocks missing from its config); only "
                         f"{supported_text()} UNets can be trained here.")
    nrb = list(nrb) if isinstance(nrb, (list, tuple)) else [int(nrb)] * len(unet_config["channel_mult"])
    if len(set(nrb)) != 1:
        raise ModelError(f"UNet with uneven res blocks per level ({nrb}) is not supported; train an SD1.x, "
                         f"SD2.x or SDXL checkpoint.")
    per = nrb[0]
    levels = len(unet_config["channel_mult"])
    depth_in = list(unet_config.get("transformer_depth") or [0] * (levels * per))
    depth_out = list(unet_config.get("transformer_depth_output") or [0] * (levels * (per + 1)))[::-1]
    down = tuple(any(d > 0 for d in depth_in[lvl * per:(lvl + 1) * per]) for lvl in range(levels))
    up = tuple(any(d > 0 for d in depth_out[b * (per + 1):(b + 1) * (per + 1)]) for b in range(levels))
    middle = unet_config.get("transformer_depth_middle")
    return UNetLayout(down_attn=down, up_attn=up, layers_per_block=per,
                      mid_attn=middle is None or middle >= 0)


def unet_layers(diffusion_model: nn.Module, layout: UNetLayout) -> list[tuple[str, nn.Module]]:
    """Every Linear/Conv2d of a ComfyUI UNet as (diffusers-style name, module).

    Raises ModelError when a layer's name does not map both ways (a UNet variant whose layout the
    name map cannot express): its LoRA keys would not load anywhere else.
    """
    out, bad = [], []
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        diffusers = ldm_to_diffusers(name, layout)
        if _LDM_BLOCK.match(diffusers) or diffusers_to_ldm(diffusers, layout) != name:
            bad.append(name)
            continue
        out.append((diffusers, module))
    if bad:
        raise ModelError(f"{len(bad)} UNet layers of this model have no diffusers/kohya name (e.g. {bad[0]}); "
                         f"its block layout is not one of {supported_text('or')}, so a LoRA trained on it "
                         f"would not load elsewhere.")
    return out
