"""Which layers get a LoRA, named as kohya names them: the family's rules applied to a model's layers.

The rules are the family's (engine/families: `select_denoiser`, `denoiser_key`, `conv_shaped` and each
text encoder's `select`); presets are "kohya" (default), "attention", "locon" or a list of name
suffixes, as kohya's `networks/lora.py` and lora-scripts define them (engine/families/unet.py and
clip.py say which layers each picks for the SD families).
"""

from __future__ import annotations

from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError
from ..families.clip import kohya_te_key
from ..model import TrainableModel
from .blocks import layout_for, ranks
from .network import LoRANetwork
from .variants import module_factory


def te_aliases(peft_prefix: str, name: str) -> tuple[str, ...]:
    """Names other tools give a text-encoder layer: diffusers/PEFT's `text_encoder.<name>`."""
    return (peft_prefix + name,)


def build_network(model: TrainableModel, cfg: TrainConfig, *, include_text_encoder: bool | None = None
                  ) -> LoRANetwork:
    """Create (not attach) the LoRA modules for `model` as `cfg` asks."""
    info = model.info
    spec = info.spec
    preset = cfg.target_modules
    if isinstance(preset, str) and preset not in spec.presets:
        raise ConfigError(f"target_modules={preset!r} is not a {spec.display_name} preset; {spec.display_name} takes "
                          f"{', '.join(spec.presets)} or a list of layer-name suffixes.")
    network = LoRANetwork()
    layout = layout_for(cfg, spec)
    per_block = ranks(cfg, layout) if layout is not None else None  # block_dims, or blocks at lr 0 left out
    factory = module_factory(cfg)
    for name, module in model.unet_layers():
        if not spec.select_denoiser(name, module, preset):
            continue
        is_spatial_conv = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        rank, alpha = (cfg.conv_dim, cfg.conv_alpha_value) if is_spatial_conv else (cfg.lora_rank, cfg.alpha)
        key = spec.denoiser_key(name, info.layout)
        if per_block is not None:
            rank, alpha = per_block.rank(layout.index(key), is_spatial_conv, (rank, alpha))
            if rank == 0:
                continue
        conv_shaped = spec.conv_shaped is not None and spec.conv_shaped(name, module)
        network.add(key, module, rank, alpha, cfg.lora_dropout,
                    aliases=spec.denoiser_aliases(name, info.layout), conv_shaped=conv_shaped, factory=factory)
    train_te = cfg.train_text_encoder if include_text_encoder is None else include_text_encoder
    if train_te:
        for prefix, name, module in model.text_encoder_layers():
            te = spec.text_encoder(prefix)
            if te.trainable and te.select(name, module, preset):
                network.add(kohya_te_key(prefix, name), module, cfg.lora_rank, cfg.alpha, cfg.lora_dropout,
                            text_encoder=True, aliases=te_aliases(te.peft_prefix, name), factory=factory)
    if len(network) == 0:
        example = "[to_q, to_v]" if spec.objective == "ddpm" else "[linear1, linear2]"
        raise ConfigError(f"target_modules={preset!r} matched no layer of this {spec.display_name} model; use "
                          f"{', '.join(spec.presets)} or suffixes such as {example}.")
    return network
