"""Preview images from the command line's Flux.1 (`FluxModel.sample`), made as kohya's
flux_train_network.py makes its samples: seeded noise, Euler on Flux's shifted schedule
(engine/objectives/flow_sampler.py), the guidance input set to the run's sample_guidance (kohya's --g,
3.5), CFG 1 unless a prompt asks for more, then the autoencoder. The LoRA hooks stay attached, so the
image shows the LoRA as trained so far.
"""

from __future__ import annotations

import torch

from ..family_checks import PATCH_PX
from ..model import preserve_module_state
from ..objectives.flow_sampler import euler_flow, flux_schedule
from .flux_forward import flux_forward
from .flux_tiny import FLUX_SCALE, FLUX_SHIFT


@torch.no_grad()
def sample_flux(model, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
                negative: str = "", guidance: float = 3.5) -> list:
    """One PIL image per prompt, each from the same seeded noise (sides rounded down to 16 px, as kohya)."""
    width, height = max(64, width - width % PATCH_PX), max(64, height - height % PATCH_PX)
    images = []
    with preserve_module_state(model.trainable_roots() + [model.t5, model.vae]):
        for module in (*model.trainable_roots(), model.t5, model.vae):
            module.eval()
        uncond = model.encode_text([negative]) if cfg != 1.0 else None
        for prompt in prompts:
            cond = model.encode_text([prompt])
            gen = torch.Generator("cpu").manual_seed(int(seed))
            noise = torch.randn((1, 16, height // 8, width // 8), generator=gen).to(model.device, model.dtype)
            sigmas = flux_schedule(steps, (height // PATCH_PX) * (width // PATCH_PX))
            latents = euler_flow(_velocity(model, cond, guidance), noise, sigmas, cfg=cfg,
                                 uncond_velocity=_velocity(model, uncond, guidance) if uncond else None)
            images.extend(decode_flux(model.vae, latents))
    return images


def _velocity(model, cond, guidance: float):
    from .fp8 import holds_fp8

    fp8 = holds_fp8(model.transformer)  # fp8_base: previews sample under autocast (the training step does not)

    def velocity(x, sigma):
        g = torch.full_like(sigma, float(guidance)) if model.guidance_embed else None
        with torch.autocast(model.device.type, dtype=model.dtype, enabled=fp8):
            v = flux_forward(model.transformer, x, sigma, cond["context"].to(model.dtype),
                             cond["pooled"].to(model.dtype), g)
        return v.to(x.dtype)

    return velocity


def decode_flux(vae, latents: torch.Tensor) -> list:
    """Flux latents (scaled and shifted as the transformer sees them) -> PIL images."""
    from PIL import Image

    p = next(vae.parameters())
    z = latents.to(p.device, p.dtype) / FLUX_SCALE + FLUX_SHIFT
    pixels = vae.decode(z).sample
    arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]
