"""Module names: diffusers <-> LDM UNet paths, and the kohya key each LoRA module is saved under.

kohya writes SD1.x/SD2.x UNet keys from diffusers names (`lora_unet_down_blocks_0_attentions_0_...`)
and SDXL UNet keys from LDM/sgm names (`lora_unet_input_blocks_4_1_...`); text encoders always use
transformers' CLIP names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). Hosts name their
UNet modules either way (diffusers in the standalone path, LDM in ComfyUI and A1111), so both
directions are derived here from the block layout alone.
"""

from __future__ import annotations

import re

from ..model import UNetLayout

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


def kohya_unet_key(diffusers_name: str, family: str, layout: UNetLayout) -> str:
    """The kohya module key for a UNet layer: diffusers-derived for SD1/SD2, LDM-derived for SDXL."""
    path = diffusers_to_ldm(diffusers_name, layout) if family == "sdxl" else diffusers_name
    return "lora_unet_" + path.replace(".", "_")


def kohya_te_key(prefix: str, hf_name: str) -> str:
    """`("lora_te1", "text_model.encoder.layers.0.mlp.fc1")` -> `lora_te1_text_model_encoder_layers_0_mlp_fc1`."""
    return f"{prefix}_{hf_name.replace('.', '_')}"
