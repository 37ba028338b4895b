"""Rectified flow (flow matching), the objective of Flux.1, SD3 and most DiT image models.

The noisy input is the straight line between data and noise, x_sigma = (1 - sigma) x0 + sigma eps with
sigma in [0, 1], and the denoiser predicts the velocity along it: target = eps - x0 (Liu et al. 2022;
Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3). The denoiser is told sigma itself; an
adapter whose model expects another scale (SD3 in diffusers: sigma x 1000) converts it.

How sigma is drawn (`sampling`), as kohya's flux_train_utils offers it and the SD3 paper defines it:
- "uniform": sigma ~ U(0, 1).
- "sigmoid": sigma = sigmoid(sigmoid_scale * n), n ~ N(0, 1) (x-flux's sampling).
- "logit_normal": sigma = sigmoid(logit_mean + logit_std * n), SD3's lognorm(m, s) density.
- "shift": the sigmoid draw s, then shifted towards noise: shift * s / (1 + (shift - 1) * s).
- "flux_shift": the sigmoid draw, shifted by Flux's resolution-dependent mu = a line through
  (256 tokens, 0.5) and (4096 tokens, 1.15) at the latent's 2x2-patch count:
  sigma = e^mu / (e^mu + 1/s - 1).
- "sigma": u from the weighting scheme's density ("logit_normal": sigmoid(N(logit_mean, logit_std));
  "mode": u - mode_scale * (cos(pi u / 2)^2 - 1 + u) flipped, SD3's mode sampling; otherwise uniform),
  then sigma is read from the 1000-step shifted schedule at index u * 1000, as kohya's default path
  reads diffusers' FlowMatchEulerDiscreteScheduler.
A model with a guidance input (Flux.1 dev: guidance distilled into the weights) is told `guidance` at
every step; the value is a draw of its own, "cond.guidance" (a constant [B] tensor), so every step path
hands it to the adapter's `predict` with the rest of the conditioning. kohya trains with 1.0.
Loss weighting (`weighting`, SD3 paper section 3.1): "none"; "sigma_sqrt": sigma^-2; "cosmap":
2 / (pi (1 - 2 sigma + 2 sigma^2)); "logit_normal" and "mode" weigh every sample 1 (their effect is the
density of the "sigma" sampling), as in kohya and diffusers.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import Noised, Objective
from .noise import input_perturbation

SAMPLINGS = ("uniform", "sigmoid", "logit_normal", "shift", "flux_shift", "sigma")
WEIGHTINGS = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
GUIDANCE = "cond.guidance"  # the step's conditioning prefix (engine/step.py COND) + the role


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Move sigmas towards noise by `shift` (SD3's timestep shift for larger images)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's shift exponent for an image of `image_tokens` 2x2 latent patches (256 -> 0.5, 4096 -> 1.15)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_tokens - 256)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class FlowObjective(Objective):
    sampling: str = "uniform"
    weighting: str = "none"
    sigmoid_scale: float = 1.0
    shift: float = 3.0  # discrete_flow_shift in kohya
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_offset: float = 0.0
    ip_noise_gamma: float = 0.0  # input perturbation on the model's input only, as kohya's Flux training does
    ip_noise_gamma_random_strength: bool = False
    guidance: float | None = None  # the guidance input's value (None: the model has none)
    kind = "flow"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"timestep sampling {self.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting scheme {self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")

    def for_training(self, cfg, device: torch.device) -> "FlowObjective":
        """The run's sampling options (kohya's names; `timestep_sampling: auto` keeps the model's own),
        noise offset and guidance value; min-SNR is a DDPM weighting and does not apply to flow."""
        sampling = cfg.timestep_sampling if cfg.timestep_sampling != "auto" else self.sampling
        return dataclasses.replace(
            self, sampling=sampling, weighting=cfg.weighting_scheme, sigmoid_scale=cfg.sigmoid_scale,
            shift=cfg.discrete_flow_shift, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale, noise_offset=cfg.noise_offset, ip_noise_gamma=cfg.ip_noise_gamma,
            ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength, guidance=None if self.guidance is None else cfg.guidance_scale)

    # --- draws ---------------------------------------------------------------------------------------
    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device, b = x0.device, x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((b, x0.shape[1], 1, 1), generator=generator, device=device)
        drawn = {"noise": noise, "sigma": self.sample_sigmas(b, x0.shape, generator, device)}
        if self.guidance is not None:
            drawn[GUIDANCE] = torch.full((b,), float(self.guidance), device=device)
        if self.ip_noise_gamma:  # a key of its own: the CUDA graph gets a buffer for it like any draw
            drawn["ip_noise"] = input_perturbation(x0, generator, self.ip_noise_gamma,
                                                   self.ip_noise_gamma_random_strength)
        return drawn

    def sample_sigmas(self, n: int, shape, generator: torch.Generator, device) -> torch.Tensor:
        def normal():
            return torch.randn((n,), generator=generator, device=device)

        if self.sampling == "uniform":
            return torch.rand((n,), generator=generator, device=device)
        if self.sampling == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * normal())
        if self.sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * normal())
        if self.sampling == "shift":
            return shifted(torch.sigmoid(self.sigmoid_scale * normal()), self.shift)
        if self.sampling == "flux_shift":
            tokens = (shape[-2] // 2) * (shape[-1] // 2)
            return time_shift(flux_mu(tokens), torch.sigmoid(self.sigmoid_scale * normal()))
        return self._schedule_sigmas(n, generator, device)

    def _schedule_sigmas(self, n: int, generator: torch.Generator, device, steps: int = 1000) -> torch.Tensor:
        if self.weighting == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((n,), generator=generator, device=device))
        else:
            u = torch.rand((n,), generator=generator, device=device)
            if self.weighting == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        schedule = shifted(torch.linspace(1.0, 1.0 / steps, steps, device=device), self.shift)
        return schedule[(u * steps).long().clamp(0, steps - 1)]

    # --- inside the step -------------------------------------------------------------------------------
    def noised(self, x0: torch.Tensor, drawn: dict[str, torch.Tensor]) -> Noised:
        noise, sigma = drawn["noise"], drawn["sigma"]
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        model_noise = noise + drawn["ip_noise"] if "ip_noise" in drawn else noise  # the target keeps `noise`
        return Noised(noisy=(1 - s) * x0 + s * model_noise, timestep=sigma, target=noise - x0, weight=self.weights(sigma))

    def weights(self, sigma: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "sigma_sqrt":
            return sigma.float() ** -2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
        return None

    def describe(self) -> str:
        guidance = "" if self.guidance is None else f", guidance {self.guidance:g}"
        return f"flow ({self.sampling} sampling, {self.weighting} weighting{guidance})"
