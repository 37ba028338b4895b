"""Noise shapes kohya offers beside plain Gaussian noise, for the DDPM objective.

- Multi-resolution ("pyramid") noise (Whitaker 2023, kohya's `multires_noise_iterations` /
  `multires_noise_discount`): to the step's noise are added Gaussian noises drawn at ever coarser sizes
  (each side divided by r**i, r uniform in [2, 4)), bilinearly upsampled and weighted discount**i; the
  sum is scaled back to unit standard deviation. Low-frequency noise teaches the model to change large
  areas (overall brightness, colour), which plain white noise hardly ever asks for.
- Input perturbation (Ning et al. 2023, arXiv 2301.11706, kohya's `ip_noise_gamma`): the denoiser's
  input is noised with noise + gamma * xi (xi a fresh Gaussian) while the target keeps the plain noise,
  a regulariser against exposure bias. With `ip_noise_gamma_random_strength` the strength is drawn
  uniformly from [0, gamma) each step.

Both are drawn from the run's generator, so a seed gives the same run on every path and on resume. The
level sizes must be known on the host; kohya draws r from Python's `random`, here a Python generator is
seeded from the torch generator's state (`host_rng`), which lives on the host even for a CUDA generator:
no GPU read, so the CUDA-graph step never waits for the previous step to finish.
"""

from __future__ import annotations

import hashlib
import random

import torch
import torch.nn.functional as F


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
                  ) -> torch.Tensor:
    """kohya's `pyramid_noise_like` on `noise` [B, C, H, W] (not modified), with draws from `generator`."""
    b, c, h, w = noise.shape
    out = noise.clone()
    rng = host_rng(generator)
    for i in range(iterations):
        r = rng.random() * 2 + 2  # each level's side is divided by r**i, r in [2, 4)
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        coarse = torch.randn((b, c, hn, wn), generator=generator, device=noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break  # the coarsest level is one pixel wide
    return out / out.std()


def host_rng(generator: torch.Generator) -> random.Random:
    """A Python generator that depends only on `generator`'s current state (read on the host, no sync)."""
    return random.Random(hashlib.sha256(generator.get_state().numpy().tobytes()).digest())


def input_perturbation(x0: torch.Tensor, generator: torch.Generator, gamma: float, random_strength: bool
                       ) -> torch.Tensor:
    """The extra noise gamma * xi added to the denoiser's input only (not to its target)."""
    xi = torch.randn(x0.shape, generator=generator, device=x0.device)
    if random_strength:
        return xi * (torch.rand((1,), generator=generator, device=x0.device) * gamma)
    return xi * gamma
