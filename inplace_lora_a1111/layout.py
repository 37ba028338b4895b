"""The block layout of an LDM/sgm UNet, read from its module names.

`engine.lora.names.ldm_to_diffusers` needs the layout (blocks per level, which levels have attention)
to turn `input_blocks.4.1...` into `down_blocks.1.attentions.0...`. SD1/SD2 and SDXL have fixed
layouts, but distilled and custom checkpoints A1111 loads may not, so the layout is read from the
module names the loaded UNet really has: downsamplers (`input_blocks.N.0.op`) mark the levels, and a
`.1.proj_in` / `.1.transformer_blocks` child marks a block with attention.
"""

from __future__ import annotations

import re
from typing import Iterable

from engine.model import UNetLayout

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
