"""The Flux.1-dev benchmark workload: the full-size layout with random weights, 1024 px, cached data.

Each peer trains its own implementation of Flux.1-dev (kohya's `flux_models.Flux`, diffusers'
`FluxTransformer2DModel`, ComfyUI's `comfy.ldm.flux`), built here directly on the GPU in bf16 and
filled with the same kind of random weights (N(0, 0.02) matrices, unit norm scales, zero biases, one
seed): the numbers differ between the classes' parameter orders, the shapes and the work do not.
Data as every tool takes it cached: latents [B, 16, 128, 128] and text conditioning of T5-XXL's 512
tokens x 4096 plus CLIP-L's pooled 768. `BENCH_SMOKE_RES` (CPU smoke runs) also shrinks the model
to one double and one single block of width 256 with 8 text tokens of width 64 (a one-layer T5).
"""

from __future__ import annotations

from .common import SEED, SMOKE_RES, WORKLOADS, device

MODEL = "flux1"


def dims():
    """flux_tiny.FluxDims of the workload (flux1-dev; a tiny one in smoke runs)."""
    from dataclasses import replace

    from engine.models.flux_tiny import FLUX1_DEV, MICRO

    return replace(MICRO, depth=1, depth_single=1, vec_in=768) if SMOKE_RES else FLUX1_DEV


def text_tokens() -> int:
    return 8 if SMOKE_RES else WORKLOADS[MODEL]["tokens"]


def latent_side() -> int:
    return (SMOKE_RES or WORKLOADS[MODEL]["resolution"]) // 8


def init_random_(module, seed: int = SEED) -> None:
    """Fill every parameter and float buffer in place, on its own device: matrices N(0, 0.02),
    one-dimensional weights and norm scales 1, biases 0, integer `position_ids` buffers arange."""
    import torch

    gen = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                if name.endswith("position_ids"):
                    p.copy_(torch.arange(p.shape[-1], device=p.device).expand(p.shape))
                continue
            if p.dim() >= 2:
                p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, 0.02, generator=gen))
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)


def build_random(make, *, dtype=None, seed: int = SEED):
    """`make()` built on the meta device, materialised on the benchmark device in `dtype` (bf16 by
    default), filled by init_random_: no full-precision copy ever exists."""
    import torch

    with torch.device("meta"):
        module = make()
    module = module.to_empty(device=device()).to(dtype or torch.bfloat16)
    init_random_(module, seed)
    return module.requires_grad_(False).eval()


def random_text(batch: int, device_=None):
    """(T5 hidden states [B, tokens, context], CLIP-L pooled [B, 768 or the smoke width])."""
    import torch

    d = dims()
    dev = device_ or device()
    g = torch.Generator(dev).manual_seed(SEED + 3)
    return (torch.randn(batch, text_tokens(), d.context_in, generator=g, device=dev),
            torch.randn(batch, d.vec_in, generator=g, device=dev))


def random_latents(n: int, device_=None):
    """Flux VAE latents, already shifted and scaled: [n, 16, side, side]."""
    import torch

    dev = device_ or device()
    g = torch.Generator(dev).manual_seed(SEED + 4)
    side = latent_side()
    return torch.randn(n, 16, side, side, generator=g, device=dev)


def bfl_state_dict(dtype=None):
    """The workload's Flux as a BFL state dict on the benchmark device (what a flux1-dev file holds).
    ComfyUI only detects width 3072, so smoke runs get one block of each kind at full width."""
    import torch
    from dataclasses import replace

    from engine.models.flux_tiny import COMFY_TINY, flux_tensor_shapes

    gen = torch.Generator(device()).manual_seed(SEED)
    out = {}
    d = replace(COMFY_TINY, context_in=dims().context_in) if SMOKE_RES else dims()
    for key, shape in sorted(flux_tensor_shapes(d).items()):
        if key.endswith(".scale"):
            t = torch.ones(shape, device=device())
        elif key.endswith(".bias"):
            t = torch.zeros(shape, device=device())
        else:
            t = torch.empty(shape, device=device()).normal_(0.0, 0.02, generator=gen)
        out[key] = t.to(dtype or torch.bfloat16)
    return out


def tiny_t5_config() -> dict:
    """T5 encoder overrides for smoke runs: width 64 = the smoke model's context_in."""
    return dict(num_layers=1, d_model=dims().context_in, d_ff=128, d_kv=16, num_heads=4)


def t5_tokenizer_folder() -> str:
    """A T5-XXL tokenizer without the hub: the one ComfyUI ships (comfy/text_encoders/t5_tokenizer)."""
    import os

    from .peer_comfy import comfy_root

    return os.path.join(comfy_root(), "comfy", "text_encoders", "t5_tokenizer")


class BenchFluxData:
    """The workload's cached data as an adapter's encoders give it: random latents and T5/CLIP-L
    conditioning of the real shapes (text of `text_tokens()` tokens), the same for a caption every time."""

    def encode_images(self, pixels):
        import torch

        g = torch.Generator(self.device).manual_seed(SEED + pixels.shape[0])
        b, _, h, w = pixels.shape
        return torch.randn(b, 16, h // 8, w // 8, generator=g, device=self.device)

    def encode_text(self, captions):
        import zlib

        import torch

        d, rows, pooled = dims(), [], []
        for caption in captions:
            g = torch.Generator(self.device).manual_seed(zlib.crc32(caption.encode()))
            rows.append(torch.randn(1, text_tokens(), d.context_in, generator=g, device=self.device))
            pooled.append(torch.randn(1, d.vec_in, generator=g, device=self.device))
        return {"context": torch.cat(rows).to(self.dtype), "pooled": torch.cat(pooled).to(self.dtype)}


def engine_model():
    """The standalone engine's FluxModel over the workload's random transformer (bf16, on the device),
    fed the workload's cached data as every peer is (`BenchFluxData`), so neither encoder is built."""
    import torch
    from torch import nn

    from engine.models.flux_adapter import FluxModel
    from engine.models.flux_model import FluxTransformer

    class BenchFlux(BenchFluxData, FluxModel):
        pass

    transformer = build_random(lambda: FluxTransformer(dims()))
    return BenchFlux(transformer, None, nn.Module(), nn.Module(), None, None, name="random-flux1",
                     device=device(), dtype=torch.bfloat16)
