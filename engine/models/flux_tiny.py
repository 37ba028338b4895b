"""Flux.1 files with random weights in Black Forest Labs' own layout, for tests and benchmarks.

`flux1-dev.safetensors` is a flat state dict of the BFL module tree (`img_in`, `time_in`, `vector_in`,
`guidance_in`, `txt_in`, `double_blocks.N.*`, `single_blocks.N.*`, `final_layer.*`); `ae.safetensors`
is an LDM-style KL autoencoder with 16 latent channels and no quant convs. Loaders infer everything
they build from key names and a few shapes, so these files carry the real key layout and let the
number of blocks vary:

- ComfyUI 0.3.75 (`comfy/model_detection.py: detect_unet_config`) fixes `num_heads=24`,
  `axes_dim=[16, 56, 56]` (head dim 128) and `mlp_ratio=4`, and reads the width from `img_in.weight`:
  so the width must stay 3072. Blocks are counted (one double and one single block are enough),
  `vec_in_dim` and `context_in_dim` are read from `vector_in`/`txt_in`.
- kohya (`library/flux_utils.py: analyze_checkpoint_state`) also keeps the flux1-dev config and only
  replaces the block counts; `guidance_in` present means dev, absent means schnell.
- ComfyUI's VAE loader (`comfy/sd.py: VAE.__init__`) fixes `ch=128, ch_mult=[1, 2, 4, 4]` and reads
  the latent channels from `decoder.conv_in.weight`: only the full-width autoencoder loads there.

`COMFY_TINY` (one double, one single block at full width, ~0.5 B parameters) is the smallest Flux
that those loaders accept; `MICRO` keeps head dim 128 at a width of 256 for engine-only tests that
build the model from the file's shapes. Nothing is downloaded; the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # latent = (ae latent - shift) * scale (ComfyUI latent_formats.Flux)
HEAD_DIM = 128  # sum of the rotary axes [16, 56, 56]


@dataclass(frozen=True)
class FluxDims:
    """The hyper-parameters a BFL Flux file implies (flux1-dev by default)."""

    hidden: int = 3072
    depth: int = 19  # double-stream blocks
    depth_single: int = 38
    mlp_ratio: float = 4.0
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    vec_in: int = 768  # CLIP-L pooled output
    context_in: int = 4096  # T5-XXL hidden states
    guidance_embed: bool = True  # dev: True, schnell: False
    qkv_bias: bool = True

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)


FLUX1_DEV = FluxDims()
FLUX1_SCHNELL = FluxDims(guidance_embed=False)
COMFY_TINY = replace(FLUX1_DEV, depth=1, depth_single=1)
# with a T5 of width 64 (ComfyUI: model_options["t5xxl_model_config"]) instead of T5-XXL's 4096
COMFY_TINY_T5_64 = replace(COMFY_TINY, context_in=64)
MICRO = replace(FLUX1_DEV, hidden=256, depth=2, depth_single=2, vec_in=32, context_in=64)


def flux_linear_shapes(dims: FluxDims = FLUX1_DEV) -> dict[str, tuple[int, int]]:
    """Every Linear of the BFL module tree: {module name: (out_features, in_features)}."""
    h, m = dims.hidden, dims.mlp
    out = {"img_in": (h, dims.in_channels), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
           "vector_in.in_layer": (h, dims.vec_in), "vector_in.out_layer": (h, h)}
    if dims.guidance_embed:
        out.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    out["txt_in"] = (h, dims.context_in)
    for i in range(dims.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out.update({f"{p}_mod.lin": (6 * h, h), f"{p}_attn.qkv": (3 * h, h), f"{p}_attn.proj": (h, h),
                        f"{p}_mlp.0": (m, h), f"{p}_mlp.2": (h, m)})
    for i in range(dims.depth_single):
        p = f"single_blocks.{i}"
        out.update({f"{p}.linear1": (3 * h + m, h), f"{p}.linear2": (h, h + m), f"{p}.modulation.lin": (3 * h, h)})
    out.update({"final_layer.linear": (dims.in_channels, h), "final_layer.adaLN_modulation.1": (2 * h, h)})
    return out


def flux_tensor_shapes(dims: FluxDims = FLUX1_DEV) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL Flux file: Linear weights and biases plus the q/k RMSNorm scales."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in flux_linear_shapes(dims).items():
        shapes[f"{name}.weight"] = (o, i)
        if dims.qkv_bias or not name.endswith("attn.qkv"):
            shapes[f"{name}.bias"] = (o,)
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(dims.depth) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(dims.depth_single)]
    for n in norms:
        shapes[f"{n}.query_norm.scale"] = shapes[f"{n}.key_norm.scale"] = (HEAD_DIM,)
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, std: float) -> dict[str, torch.Tensor]:
    """N(0, std) weights, zero biases, unit norm scales: finite, non-constant outputs at any depth."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        module = key.rsplit(".", 2)[-2]
        if key.endswith(".scale") or ("norm" in module and key.endswith(".weight")):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        out[key] = t.to(dtype)
    return out


def flux_state_dict(dims: FluxDims = COMFY_TINY, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    std: float = 0.02, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random weights in BFL layout; `prefix="model.diffusion_model."` gives a checkpoint's UNet part."""
    return {prefix + k: v for k, v in _random(flux_tensor_shapes(dims), seed, dtype, std).items()}


def flux_vae_shapes(*, ch: int = 128, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                    z_channels: int = 16) -> dict[str, tuple[int, ...]]:
    """The BFL `ae.safetensors` layout (LDM Encoder/Decoder, no quant_conv/post_quant_conv)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c), norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    block_in = ch
    for i, mult in enumerate(ch_mult):
        block_in = ch * ((1,) + tuple(ch_mult))[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, 2 * z_channels, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    return shapes


def flux_vae_state_dict(*, seed: int = 1, dtype: torch.dtype = torch.float32, std: float = 0.02,
                        **shape_kwargs) -> dict[str, torch.Tensor]:
    """Random weights in the BFL `ae.safetensors` layout (full width by default: 84 M parameters)."""
    return _random(flux_vae_shapes(**shape_kwargs), seed, dtype, std)


def flux_vae_config(*, tiny: bool = False) -> dict:
    """diffusers `AutoencoderKL` kwargs of Flux's autoencoder (what a FLUX.1 `vae/config.json` holds);
    `tiny=True` keeps the 8x downscale and 16 channels with a few hundred channels in all."""
    blocks = [8, 16, 16, 16] if tiny else [128, 256, 512, 512]
    return dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1 if tiny else 2,
                norm_num_groups=8 if tiny else 32, block_out_channels=blocks,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                sample_size=64 if tiny else 1024, scaling_factor=FLUX_SCALE, shift_factor=FLUX_SHIFT,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, act_fn="silu")


def write_flux(path, dims: FluxDims = COMFY_TINY, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a Flux diffusion-model file (what Load Diffusion Model / kohya's --pretrained_model_name_or_path read)."""
    from safetensors.torch import save_file

    save_file(flux_state_dict(dims, seed=seed, dtype=dtype), str(path))
    return str(path)


def write_flux_vae(path, *, seed: int = 1, dtype: torch.dtype = torch.float32, **shape_kwargs) -> str:
    """Write a Flux `ae.safetensors` (what Load VAE / kohya's --ae read)."""
    from safetensors.torch import save_file

    save_file(flux_vae_state_dict(seed=seed, dtype=dtype, **shape_kwargs), str(path))
    return str(path)
