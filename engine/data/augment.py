"""Image augmentation on the device with kornia: horizontal flips and colour jitter.

Parameters are drawn from the sample's own seeded generator (see text.sample_rng) and applied with
kornia's functional ops, rather than kornia's random modules, which draw from torch's global RNG and
would make a resumed run diverge. Random crops happen at load time (they change the bucket window,
not the pixels), see train_data.py.
"""

from __future__ import annotations

import math
import random

import torch
from kornia import enhance

# At strength 1.0: brightness +-0.2, contrast and saturation x[0.7, 1.3], hue +-0.1*pi radians.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.2, 0.3, 0.3, 0.1 * math.pi


def jitter_params(rng: random.Random, strength: float) -> tuple[float, float, float, float]:
    """(brightness shift, contrast factor, saturation factor, hue shift) for one image."""
    u = lambda: rng.uniform(-1.0, 1.0)  # noqa: E731
    return (_BRIGHTNESS * strength * u(), 1 + _CONTRAST * strength * u(),
            1 + _SATURATION * strength * u(), _HUE * strength * u())


def color_jitter(pixels: torch.Tensor, params: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """pixels [B,3,H,W] in [0,1] -> jittered, still in [0,1]; one parameter tuple per image."""
    p = torch.tensor(params, dtype=pixels.dtype, device=pixels.device)
    out = enhance.adjust_brightness(pixels, p[:, 0])
    out = enhance.adjust_contrast(out, p[:, 1])
    out = enhance.adjust_saturation(out, p[:, 2])
    out = enhance.adjust_hue(out, p[:, 3])
    return out.clamp(0, 1)


def flip_where(x: torch.Tensor, flags: list[bool]) -> torch.Tensor:
    """Mirror the images (or latents) of a batch [B,C,H,W] whose flag is set."""
    if not any(flags):
        return x
    mask = torch.tensor(flags, device=x.device).view(-1, 1, 1, 1)
    return torch.where(mask, torch.flip(x, dims=[3]), x)


def per_step_pixel_changes(cfg) -> list[str]:
    """The options that change an image's pixels every step (`random_crop`, `color_jitter`): its latent
    differs each time, so it cannot be cached (flips can: both sides are cached)."""
    return [name for name, on in (("random_crop", cfg.random_crop), ("color_jitter", cfg.color_jitter > 0)) if on]
