"""The SD UNet kit the SD1, SD2 and SDXL family files share: block layout, diffusers <-> LDM names, which
layers get a LoRA, and the two ways kohya names them.

kohya writes SD1.x/SD2.x UNet keys from diffusers names (`lora_unet_down_blocks_0_attentions_0_...`)
and SDXL UNet keys from LDM/sgm names (`lora_unet_input_blocks_4_1_...`). Hosts name their UNet
modules either way (diffusers in the standalone path, LDM in ComfyUI, A1111 and Forge), so both
directions are derived here from the block layout alone, and every adapter hands the engine
diffusers-style names.

Target presets mirror kohya's `networks/lora.py`:
- "kohya" (default): every Linear and 1x1 Conv2d inside the UNet's transformer blocks
  (`...attentions.N...`: proj_in/out, attn1/attn2 q/k/v/out, ff) -> 192 modules for SD1.5, 722 for SDXL.
- "attention": only the attention projections (to_q/k/v/out.0).
- "locon": "kohya" plus the ResNet and resampler convs (3x3 at `conv_rank`), `time_emb_proj` and
  1x1 `conv_shortcut`, as kohya's `conv_dim` option does.
- a list of name suffixes (lora-scripts' `target_modules: [to_q, to_k, to_v, to_out.0]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass
class UNetLayout:
    """The block structure that maps diffusers UNet names to LDM (`input_blocks.N.M`) names and back.

    `down_attn[i]` / `up_attn[i]`: whether down/up block i has attentions; `layers_per_block` counts
    resnets per down block (up blocks have one more), as in diffusers' config.
    """

    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    layers_per_block: int = 2
    mid_attn: bool = True

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetLayout":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        lpb = get("layers_per_block", 2)
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            down_attn=tuple("CrossAttn" in t for t in get("down_block_types")),
            up_attn=tuple("CrossAttn" in t for t in get("up_block_types")),
            layers_per_block=lpb,
            mid_attn=mid is not None and "CrossAttn" in str(mid),
        )


SD_LAYOUT = UNetLayout(down_attn=(True, True, True, False), up_attn=(False, True, True, True))
SDXL_LAYOUT = UNetLayout(down_attn=(False, True, True), up_attn=(True, True, False))



_RESNET_D2L = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_L2D = {v: k for k, v in _RESNET_D2L.items()}
_TOP_D2L = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_L2D = {v: k for k, v in _TOP_D2L.items()}


def _resnet_d2l(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET_D2L.get(head, head) + ("." + tail if tail else "")


def _resnet_l2d(rest: str) -> str:
    for ldm, diff in _RESNET_L2D.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm):]
    return rest


def diffusers_to_ldm(name: str, layout: UNetLayout) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (for the SDXL layout)."""
    for d, l in _TOP_D2L.items():
        if name == d or name.startswith(d + "."):
            return l + name[len(d):]
    per_down = layout.layers_per_block + 1
    per_up = layout.layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per_down}.0.{rest.replace('conv', 'op', 1)}"
        idx = 1 + b * per_down + i
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_resnet_d2l(rest)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        idx = 0 if i == 0 else (2 if layout.mid_attn else 1)
        return f"middle_block.{idx}.{_resnet_d2l(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            slot = 2 if layout.up_attn[b] else 1
            return f"output_blocks.{b * per_up + per_up - 1}.{slot}.{rest}"
        idx = b * per_up + i
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_resnet_d2l(rest)}"
        return f"output_blocks.{idx}.1.{rest}"
    return name


def ldm_to_diffusers(name: str, layout: UNetLayout) -> str:
    """The inverse of `diffusers_to_ldm`; a `diffusion_model.` prefix is accepted and dropped."""
    if name.startswith("diffusion_model."):
        name = name[len("diffusion_model."):]
    for l, d in _TOP_L2D.items():
        if name == l or name.startswith(l + "."):
            return d + name[len(l):]
    per = layout.layers_per_block + 1
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", name)
    if m:
        idx, slot, rest = int(m[1]), int(m[2]), m[3]
        b, pos = divmod(idx - 1, per)
        if pos == per - 1 and slot == 0 and rest.startswith("op"):
            return f"down_blocks.{b}.downsamplers.0.{rest.replace('op', 'conv', 1)}"
        if slot == 0:
            return f"down_blocks.{b}.resnets.{pos}.{_resnet_l2d(rest)}"
        return f"down_blocks.{b}.attentions.{pos}.{rest}"
    m = re.match(r"middle_block\.(\d+)\.(.+)$", name)
    if m:
        idx, rest = int(m[1]), m[2]
        if layout.mid_attn and idx == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{0 if idx == 0 else 1}.{_resnet_l2d(rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", name)
    if m:
        idx, slot, rest = int(m[1]), int(m[2]), m[3]
        b, pos = divmod(idx, per)
        if slot == 0:
            return f"up_blocks.{b}.resnets.{pos}.{_resnet_l2d(rest)}"
        if slot == 1 and layout.up_attn[b]:
            return f"up_blocks.{b}.attentions.{pos}.{rest}"
        return f"up_blocks.{b}.upsamplers.0.{rest}"
    return name



# --- which layers get a LoRA ------------------------------------------------------------------------

_ATTN_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_IN_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
_RESNET_LAYERS = re.compile(r"\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)$|"
                            r"\.(downsamplers|upsamplers)\.0\.conv$")
_SD2_PROJ_IO = re.compile(r"\.attentions\.\d+\.proj_(in|out)$")


def is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def matches_suffix(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_unet_layer(name: str, module: nn.Module, preset) -> bool:
    """Whether the UNet layer `name` (diffusers-style) gets a LoRA under `preset`."""
    if isinstance(preset, (list, tuple)):
        return matches_suffix(name, preset)
    if preset == "attention":
        return bool(_ATTN_PROJ.search(name))
    in_transformer = bool(_IN_TRANSFORMER.search(name)) and is_pointwise(module)
    if preset == "locon":
        return in_transformer or bool(_RESNET_LAYERS.search(name))
    return in_transformer


def conv_shaped_proj(name: str, module: nn.Module) -> bool:
    """SD2's proj_in/proj_out, saved as 1x1 convs: kohya's train_network.py builds SD2 from a single-file
    checkpoint with 1x1-conv proj_in/out (model_util, use_linear_projection off), so kohya SD2 files store
    them as [r,in,1,1]/[out,r,1,1] and kohya cannot load [r,in] there; the hosts' Linear layers take
    either shape."""
    return isinstance(module, nn.Linear) and bool(_SD2_PROJ_IO.search(name))


# --- kohya keys ---------------------------------------------------------------------------------------

def diffusers_key(name: str, layout: UNetLayout) -> str:
    """kohya's SD1/SD2 key: from the diffusers name."""
    return "lora_unet_" + name.replace(".", "_")


def ldm_key(name: str, layout: UNetLayout) -> str:
    """kohya's SDXL key: from the LDM/sgm name."""
    return "lora_unet_" + diffusers_to_ldm(name, layout).replace(".", "_")


def unet_aliases(name: str, layout: UNetLayout) -> tuple[str, ...]:
    """Names other tools give this UNet layer: kohya with either naming, ComfyUI-native, diffusers/PEFT."""
    ldm = diffusers_to_ldm(name, layout)
    return ("lora_unet_" + name.replace(".", "_"), "lora_unet_" + ldm.replace(".", "_"),
            "diffusion_model." + ldm, "unet." + name, name, "lycoris_" + name.replace(".", "_"))
