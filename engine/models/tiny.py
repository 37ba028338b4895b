"""Tiny random SD1/SD2/SDXL models for tests and the demo, and full-size ones on the meta device.

The tiny models keep every structural feature the trainer relies on (cross-attention blocks and
plain blocks, an 8x VAE, SDXL's two encoders with pooled output and size ids) with a few thousand
channels in total, so a training step at 64x64 px runs on a CPU in a fraction of a second. They
use the real CLIP tokenizer, so captions tokenize exactly as with real models.
`full_size_model` builds the real architectures on the meta device (no memory) to count layers.
"""

from __future__ import annotations

import torch

from .clip_tokenizer import BANG_ID, EOS_ID, clip_tokenizer
from .configs import SD_SCALING, SDXL_SCALING, ModelConfigs, build_components, model_configs
from .diffusers_adapter import DiffusersModel


def _tiny_clip(hidden: int, act: str, proj: int) -> dict:
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                projection_dim=proj, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _tiny_vae(scaling: float) -> dict:
    # four blocks keep the real 8x downscale, so bucket sizes and latent shapes match real models
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=64, scaling_factor=scaling,
                force_upcast=False)


def tiny_configs(family: str) -> ModelConfigs:
    """Configs of the tiny models (also used to write and load tiny single-file checkpoints)."""
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                norm_num_groups=16, attention_head_dim=4, flip_sin_to_cos=True, freq_shift=0)
    if family == "sd1":
        unet.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
        return ModelConfigs("sd1", unet, _tiny_vae(SD_SCALING), [("CLIPTextModel", _tiny_clip(32, "quick_gelu", 32))],
                            [EOS_ID], 64)
    if family == "sd2":  # SD2's traits: OpenCLIP-style gelu encoder, linear proj_in/out, "!" padding
        unet.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                    use_linear_projection=True)
        return ModelConfigs("sd2", unet, _tiny_vae(SD_SCALING), [("CLIPTextModel", _tiny_clip(32, "gelu", 32))],
                            [BANG_ID], 64)
    if family == "sdxl":
        unet.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64,
                    transformer_layers_per_block=[1, 2], use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8)
        return ModelConfigs("sdxl", unet, _tiny_vae(SDXL_SCALING),
                            [("CLIPTextModel", _tiny_clip(32, "quick_gelu", 32)),
                             ("CLIPTextModelWithProjection", _tiny_clip(32, "gelu", 32))],
                            [EOS_ID, BANG_ID], 64)
    raise ValueError(f"no tiny config for {family!r}; use sd1, sd2 or sdxl")


def _init_small(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Deterministic weights of a sane scale (independent of torch's global RNG): N(0, 0.02) for
    matrices, norms at identity, so outputs are finite and depend on every layer."""
    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in mod.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.normal_(0.0, 0.01, generator=gen)
                else:
                    p.normal_(0.0, 0.02 if p.dim() < 2 or p.shape[-1] > 3 else 0.05, generator=gen)


def build_tiny(family: str, seed: int = 0, **kwargs) -> DiffusersModel:
    cfgs = tiny_configs(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, tes = build_components(cfgs)
    gen = torch.Generator().manual_seed(seed)
    for module in (unet, vae, *tes):
        _init_small(module, gen)
        module.eval().requires_grad_(False)
    toks = [clip_tokenizer() for _ in cfgs.text_encoders]
    kwargs.setdefault("name", f"tiny_{family}")
    kwargs.setdefault("owns_weights", True)
    kwargs.setdefault("pad_ids", cfgs.pad_ids)
    return DiffusersModel.from_components(unet=unet, vae=vae, text_encoders=tes, tokenizers=toks, family=family,
                                          **kwargs)


def tiny_sd1(seed: int = 0, **kwargs) -> DiffusersModel:
    """A tiny random SD1-structured model (CLIP-L-like encoder, 2-block UNet, 8x VAE)."""
    return build_tiny("sd1", seed, **kwargs)


def tiny_sd2(seed: int = 0, **kwargs) -> DiffusersModel:
    """A tiny random SD2-structured model (gelu encoder, linear proj_in/out); pass
    prediction_type="v_prediction" for a 768-v-like one."""
    return build_tiny("sd2", seed, **kwargs)


def tiny_sdxl(seed: int = 0, **kwargs) -> DiffusersModel:
    """A tiny random SDXL-structured model (two encoders, pooled output, size-conditioned UNet)."""
    return build_tiny("sdxl", seed, **kwargs)


def full_size_model(family: str, device: str = "meta", *, v_model: bool = False) -> DiffusersModel:
    """The real architecture of `family` with meta (shape-only) weights, for layer/key counts.
    The VAE is left out; the model cannot compute."""
    if device != "meta":
        raise ValueError("full_size_model only builds meta models; load real weights with load_base_model")
    cfgs = model_configs(family, v_model=v_model)
    with torch.device("meta"):
        unet, _, tes = build_components(cfgs, with_vae=False)
    toks = [clip_tokenizer() for _ in cfgs.text_encoders]
    model = DiffusersModel.from_components(unet=unet, vae=None, text_encoders=tes, tokenizers=toks, family=family,
                                           prediction_type="v_prediction" if v_model else "epsilon",
                                           name=f"{family} (meta)", device="meta")
    model.info.resolution = cfgs.resolution
    return model
