"""ComfyUI's module names -> the names the engine selects and saves LoRA layers under.

ComfyUI keeps SD UNets in the LDM layout (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`) and its
CLIP text models with transformers' names under `clip_l.transformer` / `clip_h` / `clip_g`. The engine
works on diffusers-style UNet names and HF CLIP names, so the kohya keys written from ComfyUI are the
same as the standalone path's for the same model. The block layout comes from ComfyUI's `unet_config`
dict (the same one `comfy.utils.unet_to_diffusers` reads). Nothing here imports comfy.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from ..engine.errors import ModelError
from ..engine.lora.names import diffusers_to_ldm, ldm_to_diffusers
from ..engine.model import UNetLayout

_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def layout_from_unet_config(unet_config: dict) -> UNetLayout:
    """The diffusers block layout of a ComfyUI `UNetModel` config (SD1/SD2/SDXL and their variants).

    `transformer_depth` has one entry per input res block; `transformer_depth_output` is consumed
    from its end by the output blocks (`.pop()` in ComfyUI's UNetModel), so up block 0 reads the tail.
    """
    nrb = unet_config.get("num_res_blocks")
    if nrb is None:
        raise ModelError("this model has no UNet (num_res_blocks missing from its config); only SD1.x, "
                         "SD2.x and SDXL UNets can be trained here.")
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
                         f"its block layout is not one of SD1.x, SD2.x or SDXL, so a LoRA trained on it "
                         f"would not load elsewhere.")
    return out


def text_encoders(cond_stage_model: nn.Module, family: str) -> list[tuple[str, nn.Module, int | None]]:
    """(kohya prefix, HF-style text model, index of a layer to leave out or None) per encoder.

    SD1 has `clip_l`, SD2 `clip_h`, SDXL `clip_l` + `clip_g`. SD2's 24th layer is left out: the
    model reads the penultimate layer, and diffusers' (and kohya's) SD2 encoder stops at 23 layers.
    """
    def transformer(attr: str) -> nn.Module | None:
        holder = getattr(cond_stage_model, attr, None)
        return getattr(holder, "transformer", None) if holder is not None else None

    if family == "sdxl":
        l, g = transformer("clip_l"), transformer("clip_g")
        if l is None or g is None:
            raise ModelError("this SDXL CLIP has no clip_l/clip_g text encoders; load the checkpoint's own CLIP.")
        return [("lora_te1", l, None), ("lora_te2", g, None)]
    attr = "clip_h" if family == "sd2" else "clip_l"
    te = transformer(attr) or transformer("clip_l") or transformer("clip_h")
    if te is None:
        raise ModelError(f"the CLIP input has no {attr} text encoder; connect the CLIP output of the same "
                         f"Load Checkpoint node as the MODEL.")
    skip = None
    if family == "sd2":
        layers = getattr(getattr(getattr(te, "text_model", None), "encoder", None), "layers", None)
        skip = len(layers) - 1 if layers is not None and len(layers) == 24 else None
    return [("lora_te", te, skip)]


def text_encoder_layers(encoders: list[tuple[str, nn.Module, int | None]]) -> Iterator[tuple[str, str, nn.Module]]:
    """Every Linear of the encoders as (kohya prefix, HF name such as `text_model.encoder.layers.0.mlp.fc1`)."""
    for prefix, te, skip in encoders:
        for name, module in te.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            m = _LAYER_INDEX.search("." + name + ".")
            if skip is not None and m and int(m.group(1)) == skip:
                continue
            yield prefix, name, module
