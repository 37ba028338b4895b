"""The diffusion loss, defined once over (x0, noise, t) for every family the engine trains.

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t] (the DDPM schedule every SD
model was trained with); the target is eps or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 by the model's
prediction type. Min-SNR-gamma weighting (Hang et al. 2023) as kohya applies it: min(SNR, g)/SNR
for eps, min(SNR, g)/(SNR + 1) for v.
"""

from __future__ import annotations

import torch


def _gather(acp: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return acp[t].view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    a = _gather(acp, t, x0.dim())
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    a = _gather(acp, t, x0.dim())
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr_weights(t: torch.Tensor, acp: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    a = acp[t]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   acp: torch.Tensor, prediction_type: str, *, sample_weights: torch.Tensor | None = None,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of per-sample MSE, each weighted by min-SNR and the prior-loss weight."""
    tgt = target(x0, noise, t, acp, prediction_type)
    per_sample = (prediction.float() - tgt.float()).pow(2).mean(dim=tuple(range(1, x0.dim())))
    if min_snr_gamma > 0:
        per_sample = per_sample * snr_weights(t, acp, min_snr_gamma, prediction_type)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()
