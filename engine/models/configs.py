"""Diffusers/transformers configs of the families we train, written out so nothing is fetched.

`diffusers.from_single_file` would download `config.json`s from the hub to know how to build a
model; we build them from these dicts instead. The values are those of the reference releases
(runwayml SD1.5, stabilityai SD2.1-base / SD2.1 (768-v), SDXL base 1.0). `ModelConfigs` bundles
one family's UNet, VAE, text encoders and padding ids so tests can swap in tiny versions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..families import get_family

SD_SCALING, SDXL_SCALING = 0.18215, 0.13025


@dataclass
class ModelConfigs:
    """Everything needed to build one family's components with random (or meta) weights."""

    family: str  # sd1 | sd2 | sdxl
    unet: dict
    vae: dict
    # (class name, config kwargs) per text encoder, in kohya order (te1, te2)
    text_encoders: list[tuple[str, dict]] = field(default_factory=list)
    pad_ids: list[int] = field(default_factory=list)  # padding id per text encoder (49407 or 0)
    resolution: int = 512

    def copy(self) -> "ModelConfigs":
        return copy.deepcopy(self)


def _unet_common() -> dict:
    return dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
        norm_num_groups=32, norm_eps=1e-5, dropout=0.0,
    )


def unet_config(family: str, *, v_model: bool = False) -> dict:
    """UNet2DConditionModel kwargs. SD2's 512-base and 768-v share one architecture."""
    cfg = _unet_common()
    if family == "sd1":
        cfg.update(
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
        )
    elif family == "sd2":
        cfg.update(
            sample_size=96 if v_model else 64,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=v_model,
        )
    elif family == "sdxl":
        cfg.update(
            sample_size=128,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
            cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    return cfg


def vae_config(family: str, *, resolution: int = 512) -> dict:
    """AutoencoderKL kwargs: the same KL-f8 architecture everywhere, SDXL with its own scale."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu",
        norm_num_groups=32, sample_size=resolution,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        scaling_factor=SDXL_SCALING if family == "sdxl" else SD_SCALING,
        force_upcast=get_family(family).vae_fp32,
    )


def _clip_text(hidden: int, layers: int, heads: int, inter: int, act: str, proj: int) -> dict:
    return dict(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=proj, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
    )


def clip_l() -> dict:
    """OpenAI CLIP ViT-L/14 text tower (SD1.x, SDXL te1)."""
    return _clip_text(768, 12, 12, 3072, "quick_gelu", 768)


def open_clip_h() -> dict:
    """OpenCLIP ViT-H/14 with its last layer dropped: SD2 reads the penultimate layer (+ final norm),
    so diffusers' SD2 text encoder has 23 layers and its last hidden state is that output."""
    return _clip_text(1024, 23, 16, 4096, "gelu", 512)


def open_clip_bigg() -> dict:
    """OpenCLIP ViT-bigG/14 with projection (SDXL te2; its text_embeds are the pooled condition)."""
    return _clip_text(1280, 32, 20, 5120, "gelu", 1280)


def model_configs(family: str, *, v_model: bool = False) -> ModelConfigs:
    """The full-size configs of a family. `v_model` picks SD2's 768-v variant (sample size 96)."""
    encoders = {"sd1": [("CLIPTextModel", clip_l())], "sd2": [("CLIPTextModel", open_clip_h())],
                "sdxl": [("CLIPTextModel", clip_l()), ("CLIPTextModelWithProjection", open_clip_bigg())]}
    if family not in encoders:
        raise ValueError(f"unknown family {family!r}; expected sd1, sd2 or sdxl")
    spec = get_family(family)
    res = spec.native_resolution("v_prediction" if v_model else "epsilon")
    return ModelConfigs(family, unet_config(family, v_model=v_model), vae_config(family, resolution=res),
                        encoders[family], spec.pad_ids, res)


def text_encoder_class(name: str):
    import transformers

    return getattr(transformers, name)


def build_components(cfgs: ModelConfigs, *, empty: bool = False, with_vae: bool = True):
    """(unet, vae, [text encoders]) from configs. `empty=True` allocates no weights (meta parameters,
    real buffers) so a checkpoint can be assigned into them without a random init first."""
    import contextlib

    from diffusers import AutoencoderKL, UNet2DConditionModel

    if empty:
        from accelerate import init_empty_weights

        ctx = lambda: init_empty_weights(include_buffers=False)  # noqa: E731
    else:
        ctx = contextlib.nullcontext
    with ctx():
        unet = UNet2DConditionModel(**cfgs.unet)
        vae = AutoencoderKL(**cfgs.vae) if with_vae else None
        tes = []
        for cls_name, kwargs in cfgs.text_encoders:
            from transformers import CLIPTextConfig

            tes.append(text_encoder_class(cls_name)(CLIPTextConfig(**kwargs)))
    return unet, vae, tes
