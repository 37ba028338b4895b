"""The DDPM objective every SD1.x, SD2.x and SDXL model was trained with: epsilon or v prediction.

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t], t an integer timestep drawn
uniformly; the target is eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022) by the
model's prediction type. Options as kohya applies them: min-SNR-gamma weighting (Hang et al. 2023),
min(SNR, g)/SNR for eps and min(SNR, g)/(SNR + 1) for v; noise offset (a per-channel constant added
to the noise); a zero-terminal-SNR schedule (Lin et al. 2024) arrives as its alphas_cumprod, which
ends at 0. The host adapter builds the objective from its loaded model (schedule and prediction type);
the run adds its options with `for_training`.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Noised, Objective

EPSILON, V_PREDICTION = "epsilon", "v_prediction"


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
                                 ) -> torch.Tensor:
    """The SD schedule computed in float64 and rounded once to float32 (a checkpoint's fp16 buffer is not exact)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMObjective(Objective):
    alphas_cumprod: torch.Tensor  # float32 [num_train_timesteps]
    prediction_type: str = EPSILON
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    kind = "ddpm"

    def __post_init__(self):
        if self.prediction_type not in (EPSILON, V_PREDICTION):
            raise ValueError(f"prediction type {self.prediction_type!r}: expected {EPSILON} or {V_PREDICTION}")

    def for_training(self, cfg, device: torch.device) -> "DDPMObjective":
        return dataclasses.replace(self, alphas_cumprod=self.alphas_cumprod.to(device, torch.float32),
                                   min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator,
                                                            device=device)
        t = torch.randint(0, self.alphas_cumprod.shape[0], (x0.shape[0],), generator=generator, device=device)
        return {"noise": noise, "t": t}

    def _alpha(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.alphas_cumprod[t].view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._alpha(t, x0.dim())
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == EPSILON:
            return noise
        a = self._alpha(t, x0.dim())
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t]
        snr = a / (1 - a)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == V_PREDICTION else clipped / snr

    def noised(self, x0: torch.Tensor, drawn: dict[str, torch.Tensor]) -> Noised:
        noise, t = drawn["noise"], drawn["t"]
        return Noised(noisy=self.add_noise(x0, noise, t), timestep=t, target=self.target(x0, noise, t),
                      weight=self.snr_weights(t) if self.min_snr_gamma > 0 else None)

    def describe(self) -> str:
        return self.prediction_type
