"""Training objectives: what a step's noisy input, timestep, target and loss weight are.

    DDPMObjective(alphas_cumprod, prediction_type)   # SD1.x / SD2.x / SDXL (ddpm.py)
    FlowObjective(sampling=..., weighting=...)       # rectified flow (flow.py)

A host adapter says which one its loaded model trains with (`TrainableModel.objective()`); the run adds
its options (`objective.for_training(cfg, device)`); the training step (engine/step.py) calls `draw`
and `noised` and the shared loss (base.py).
"""

from .base import Noised, Objective, weighted_mse
from .ddpm import EPSILON, V_PREDICTION, DDPMObjective, scaled_linear_alphas_cumprod
from .flow import FlowObjective

__all__ = ["DDPMObjective", "EPSILON", "FlowObjective", "Noised", "Objective", "V_PREDICTION",
           "scaled_linear_alphas_cumprod", "weighted_mse"]
