"""The block layout of a denoiser, for block-wise learning rates and ranks (kohya's down_lr_weight,
mid_lr_weight, up_lr_weight, block_dims, block_alphas).

kohya numbers a UNet's blocks from its LoRA keys (networks/lora.py `get_block_index`):

- SD1.x / SD2.x (12 down, 1 mid, 12 up = 25): diffusers-style keys; down_blocks_i (resnets|attentions)_j
  is 1 + 3i + j, its downsampler 1 + 3i + 2 (block 0, conv_in, has no LoRA); mid_block is 12; up_blocks_i
  ..._j is 13 + 3i + j, its upsampler 13 + 3i + 2.
- SDXL (1 + 9 down + 3 mid + 9 up + 1 = 23): LDM keys; time/label embeddings 0, input_blocks_n is
  1 + n, middle_block_n 10 + n, output_blocks_n 13 + n, out 22.

A family names its layout in `FamilySpec.blocks`; a family with other blocks (Flux.1's double and single
blocks) declares its own counts and index rule, and the same options address its blocks by index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BlockLayout:
    down: int  # blocks down_lr_weight addresses (in order, shallow to deep)
    mid: int  # blocks mid_lr_weight addresses
    up: int  # blocks up_lr_weight addresses (deep to shallow)
    index: Callable[[str], int]  # kohya LoRA key -> block index in [0, total), -1 for none
    head: int = 0  # blocks before the down blocks (SDXL: the embeddings), weight 1 for the lr options
    tail: int = 0  # blocks after the up blocks (SDXL: out)

    @property
    def total(self) -> int:
        """How many values block_dims / block_alphas take."""
        return self.head + self.down + self.mid + self.up + self.tail


_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def sd_block_index(key: str) -> int:
    """kohya's get_block_index for SD1.x/SD2.x (diffusers-style keys)."""
    m = _UPDOWN.search(key)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else 12 + 1 + idx
    return 12 if "mid_block_" in key else -1


def sdxl_block_index(key: str) -> int:
    """kohya's get_block_index for SDXL (LDM keys)."""
    if not key.startswith("lora_unet_"):
        return -1
    name = key[len("lora_unet_"):]
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return base + int(name.split("_")[2])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else -1


SD_BLOCKS = BlockLayout(down=12, mid=1, up=12, index=sd_block_index)
SDXL_BLOCKS = BlockLayout(down=9, mid=3, up=9, head=1, tail=1, index=sdxl_block_index)
