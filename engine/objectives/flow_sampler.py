"""Sampling a rectified-flow model: Euler steps along the velocity on Flux's shifted schedule.

The denoiser predicts the velocity v = eps - x0 at noise level sigma, so a step from sigma to the next
(smaller) sigma is x + (sigma_next - sigma) * v. The schedule is kohya's flux_train_utils.get_schedule
(and BFL's flux/sampling.py): `steps` + 1 levels from 1 to 0 evenly, each shifted towards noise by
Flux's resolution-dependent mu (flow.py `flux_mu`: 0.5 at 256 image tokens, 1.15 at 4096). Classifier-free
guidance (a CFG scale other than 1) mixes an unconditional velocity in, as kohya's `denoise` does.
"""

from __future__ import annotations

from typing import Callable

import torch

from .flow import flux_mu, time_shift


def flux_schedule(steps: int, image_tokens: int, *, shift: bool = True) -> torch.Tensor:
    """`steps` + 1 sigmas from 1 to 0 (float64), shifted for an image of `image_tokens` 2x2 patches."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return time_shift(flux_mu(image_tokens), sigmas) if shift else sigmas


def euler_flow(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
               sigmas: torch.Tensor, *, cfg: float = 1.0,
               uncond_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate from noise `x` (at sigmas[0]) down the schedule; `velocity(x, sigma [B])` is the model."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        t = torch.full((x.shape[0],), s, device=x.device, dtype=torch.float32)
        v = velocity(x, t)
        if cfg != 1.0 and uncond_velocity is not None:
            u = uncond_velocity(x, t)
            v = u + (v - u) * cfg
        x = x + (s_next - s) * v
    return x
