"""Which layers get a LoRA, named as kohya names them.

Presets mirror kohya's `networks/lora.py`:
- "kohya" (default): every Linear and 1x1 Conv2d inside the UNet's transformer blocks
  (`...attentions.N...`: proj_in/out, attn1/attn2 q/k/v/out, ff) -> 192 modules for SD1.5, 722 for SDXL;
  text encoders: q/k/v/out_proj and fc1/fc2 of every layer -> 72 for SD1.5, 264 for SDXL.
- "attention": only the attention projections (to_q/k/v/out.0; q/k/v/out_proj).
- "locon": "kohya" plus the ResNet and resampler convs (3x3 at `conv_rank`), `time_emb_proj` and
  1x1 `conv_shortcut`, as kohya's `conv_dim` option does.
- a list of name suffixes (lora-scripts' `target_modules: [to_q, to_k, to_v, to_out.0]`).
Selection works on diffusers-style UNet names whatever the host calls its layers (see engine.model).
"""

from __future__ import annotations

import re

from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError
from ..model import TrainableModel
from .names import diffusers_to_ldm, kohya_te_key, kohya_unet_key
from .network import LoRANetwork
from .variants import module_factory

_ATTN_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_IN_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
_RESNET_LAYERS = re.compile(r"\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)$|"
                            r"\.(downsamplers|upsamplers)\.0\.conv$")
_SD2_PROJ_IO = re.compile(r"\.attentions\.\d+\.proj_(in|out)$")
_TE_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TE_MLP = re.compile(r"\.mlp\.(fc1|fc2)$")


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def select_unet(name: str, module: nn.Module, preset) -> bool:
    if isinstance(preset, (list, tuple)):
        return any(name == s or name.endswith("." + s) for s in preset)
    if preset == "attention":
        return bool(_ATTN_PROJ.search(name))
    in_transformer = bool(_IN_TRANSFORMER.search(name)) and _is_pointwise(module)
    if preset == "locon":
        return in_transformer or bool(_RESNET_LAYERS.search(name))
    return in_transformer


def select_text_encoder(name: str, module: nn.Module, preset) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if isinstance(preset, (list, tuple)):
        return any(name == s or name.endswith("." + s) for s in preset)
    if preset == "attention":
        return bool(_TE_ATTN.search(name))
    return bool(_TE_ATTN.search(name) or _TE_MLP.search(name))


def unet_aliases(name: str, layout) -> tuple[str, ...]:
    """Names other tools give this UNet layer: kohya with either naming, ComfyUI-native, diffusers/PEFT."""
    ldm = diffusers_to_ldm(name, layout)
    return ("lora_unet_" + name.replace(".", "_"), "lora_unet_" + ldm.replace(".", "_"),
            "diffusion_model." + ldm, "unet." + name, name, "lycoris_" + name.replace(".", "_"))


def te_aliases(prefix: str, name: str) -> tuple[str, ...]:
    peft = {"lora_te": "text_encoder.", "lora_te1": "text_encoder.", "lora_te2": "text_encoder_2."}[prefix]
    return (peft + name,)


def build_network(model: TrainableModel, cfg: TrainConfig, *, include_text_encoder: bool | None = None
                  ) -> LoRANetwork:
    """Create (not attach) the LoRA modules for `model` as `cfg` asks."""
    info = model.info
    preset = cfg.target_modules
    network = LoRANetwork()
    factory = module_factory(cfg)
    for name, module in model.unet_layers():
        if not select_unet(name, module, preset):
            continue
        is_spatial_conv = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        rank, alpha = (cfg.conv_dim, cfg.conv_alpha_value) if is_spatial_conv else (cfg.lora_rank, cfg.alpha)
        # kohya's train_network.py builds SD2 from a single-file checkpoint with 1x1-conv proj_in/out
        # (model_util, use_linear_projection off), so kohya SD2 files store them as [r,in,1,1]/[out,r,1,1]
        # and kohya cannot load [r,in] there; the hosts' Linear layers take either shape.
        conv_shaped = info.family == "sd2" and isinstance(module, nn.Linear) and bool(_SD2_PROJ_IO.search(name))
        network.add(kohya_unet_key(name, info.family, info.layout), module, rank, alpha, cfg.lora_dropout,
                    aliases=unet_aliases(name, info.layout), conv_shaped=conv_shaped, factory=factory)
    train_te = cfg.train_text_encoder if include_text_encoder is None else include_text_encoder
    if train_te:
        for prefix, name, module in model.text_encoder_layers():
            if select_text_encoder(name, module, preset):
                network.add(kohya_te_key(prefix, name), module, cfg.lora_rank, cfg.alpha, cfg.lora_dropout,
                            text_encoder=True, aliases=te_aliases(prefix, name), factory=factory)
    if len(network) == 0:
        raise ConfigError(f"target_modules={preset!r} matched no layer of this model; use kohya, "
                          f"attention, locon or suffixes such as [to_q, to_v].")
    return network
