"""The benchmark's models and data: full-size SD1.5 / SDXL with random weights, and a small image set.

Every tool trains the same random UNet (built from the engine's full-size configs with the same seed,
directly on the GPU in bf16), on the same kind of data: `DATASET_IMAGES` images at the workload's
resolution with one caption each, or latents and text conditioning of those shapes for the tools
that take them directly. Random weights are enough for speed and memory; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from .common import DATASET_IMAGES, SEED, SMOKE_RES, WORKLOADS, device


def build_unet(model: str, device=None, dtype=None):
    import torch
    from diffusers import UNet2DConditionModel

    from engine.models.configs import unet_config

    w = WORKLOADS[model]
    torch.manual_seed(SEED)
    with torch.device(device or _dev()):
        unet = UNet2DConditionModel(**unet_config(w["family"]))
    unet.requires_grad_(False).eval()
    return unet.to(dtype or torch.bfloat16)


def build_vae(model: str, device=None, dtype=None):
    import torch
    from diffusers import AutoencoderKL

    from engine.models.configs import vae_config

    w = WORKLOADS[model]
    torch.manual_seed(SEED + 1)
    with torch.device(device or _dev()):
        vae = AutoencoderKL(**vae_config(w["family"], resolution=w["resolution"]))
    return vae.requires_grad_(False).eval().to(dtype or torch.float32)


def build_text_encoders(model: str, device=None, dtype=None):
    import torch
    from transformers import CLIPTextConfig

    from engine.models.configs import model_configs, text_encoder_class

    torch.manual_seed(SEED + 2)
    out = []
    for cls_name, kwargs in model_configs(WORKLOADS[model]["family"]).text_encoders:
        with torch.device(device or _dev()):
            te = text_encoder_class(cls_name)(CLIPTextConfig(**kwargs))
        out.append(te.requires_grad_(False).eval().to(dtype or torch.bfloat16))
    return out


def engine_model(model: str, *, with_vae: bool = True):
    """The standalone engine's DiffusersModel over random full-size components (what load_base_model
    gives for a real checkpoint: UNet and text encoders in bf16, VAE in fp32)."""
    import torch

    from engine.models.clip_tokenizer import clip_tokenizer
    from engine.models.diffusers_adapter import DiffusersModel

    family = WORKLOADS[model]["family"]
    unet = build_unet(model)
    vae = build_vae(model) if with_vae else None
    tes = build_text_encoders(model)
    m = DiffusersModel.from_components(unet=unet, vae=vae, text_encoders=tes, tokenizers=[clip_tokenizer() for _ in tes],
                                       family=family, owns_weights=True, device=_dev(), dtype=torch.bfloat16,
                                       name=f"random-{model}")
    m.info.resolution = WORKLOADS[model]["resolution"]
    return m


def image_folder(root: Path, model: str, *, subfolder: str = "") -> Path:
    """`DATASET_IMAGES` PNGs (smooth colour fields plus grain) with .txt captions at the workload size."""
    import numpy as np
    from PIL import Image

    size = SMOKE_RES or WORKLOADS[model]["resolution"]
    folder = root / f"images_{model}" / subfolder if subfolder else root / f"images_{model}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(DATASET_IMAGES):
        path = folder / f"img{i:02d}.png"
        if not path.exists():
            base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + 2 * i)], -1) * 90 + 128
            arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
            Image.fromarray(arr).save(path)
        (folder / f"img{i:02d}.txt").write_text(f"a photo of subject {i}, colourful waves, detailed",
                                                  encoding="utf-8")
    return folder


def _dev() -> str:
    return device()


def random_cond(model: str, batch: int, device=None):
    """Text conditioning of the workload's shapes (77 tokens; SDXL with pooled vector)."""
    import torch

    w = WORKLOADS[model]
    device = device or _dev()
    g = torch.Generator(device).manual_seed(SEED + 3)
    ctx = torch.randn(batch, 77, w["context"], generator=g, device=device)
    pooled = torch.randn(batch, w["pooled"], generator=g, device=device) if w["pooled"] else None
    return ctx, pooled


def random_latents(model: str, n: int, device=None):
    import torch

    w = WORKLOADS[model]
    device = device or _dev()
    side = SMOKE_RES // 8 if SMOKE_RES else w["latent"]
    g = torch.Generator(device).manual_seed(SEED + 4)
    return torch.randn(n, 4, side, side, generator=g, device=device)
