"""What every training objective gives the step, and the loss they share.

An objective turns clean latents x0 into what one training step needs: it draws the step's noise and
timesteps from the run's generator (`draw`, on the host side of a CUDA graph, always in the same order
so a seed gives the same run on every path), and from those draws makes the denoiser's input, the
timestep (or sigma) the denoiser is told, the target it should predict and a per-sample loss weight
(`noised`, inside the graph). The loss is then the same for all: the mean over the batch of each
sample's mean squared error, times its objective weight and its data weight (prior_loss_weight).

Draws are a flat dict of tensors: the CUDA-graphed step gives each one a static buffer by its key, so an
objective with other draws needs no change there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Noised:
    """One batch made ready for the denoiser."""

    noisy: torch.Tensor  # the denoiser's input
    timestep: torch.Tensor  # [B]: what the denoiser is told (DDPM: integer t; flow: sigma in [0, 1])
    target: torch.Tensor  # what it should predict
    weight: torch.Tensor | None  # [B] per-sample loss weight from the objective (min-SNR, SD3 weighting), or None


class Objective(ABC):
    """A training objective. Subclasses: `ddpm.DDPMObjective`, `flow.FlowObjective`."""

    kind: str  # "ddpm" | "flow": what families name in FamilySpec.objective

    @abstractmethod
    def for_training(self, cfg, device: torch.device) -> "Objective":
        """This objective with the run's options (min-SNR, noise offset, ...) and its tables on `device`."""

    @abstractmethod
    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The step's random draws (noise, timesteps) for the batch `x0`, from `generator`."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, drawn: dict[str, torch.Tensor]) -> Noised:
        """The denoiser's input, timestep, target and weight from x0 and this step's draws."""

    def loss(self, prediction: torch.Tensor, noised: Noised, sample_weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        return weighted_mse(prediction, noised.target, noised.weight, sample_weights)

    def describe(self) -> str:
        """One line for the run's summary."""
        return self.kind


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of per-sample MSE (float32), each times `weight` and then `sample_weights`."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.dim())))
    if weight is not None:
        per_sample = per_sample * weight
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()
