"""Optimizers and learning-rate schedules by the names kohya users know.

AdamW is torch's (fused on CUDA: one kernel for all LoRA tensors instead of thousands), AdamW8bit
comes from bitsandbytes where it works (CUDA), Adafactor from transformers, Prodigy from `prodigyopt`,
and Lion is small enough to live here. Schedules come from diffusers' `get_scheduler`.
"""

from __future__ import annotations

import logging

import torch

from .config import TrainConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; use ~3-10x smaller lr than AdamW."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def param_groups(cfg: TrainConfig, unet_params, te_params, unet_groups: list[dict] | None = None) -> list[dict]:
    """`unet_groups`: the UNet's params already grouped (block-wise learning rates, engine/lora/blocks.py)."""
    groups = []
    if unet_groups is not None:
        groups += unet_groups
    elif unet_params:
        groups.append({"params": list(unet_params), "lr": cfg.learning_rate, "name": "unet"})
    if te_params:
        groups.append({"params": list(te_params), "lr": cfg.text_encoder_lr, "name": "text_encoder"})
    return groups


def build_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    name, args = cfg.optimizer, dict(cfg.optimizer_args)
    args.setdefault("weight_decay", cfg.weight_decay)
    if name == "AdamW":
        if device.type == "cuda":
            args.setdefault("fused", True)
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, **args)
    if name == "Lion":
        return Lion(groups, lr=cfg.learning_rate, **args)
    if name == "AdamW8bit":
        if device.type != "cuda":
            raise ConfigError("optimizer AdamW8bit needs a CUDA GPU (bitsandbytes); use AdamW on this device.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer AdamW8bit needs bitsandbytes: pip install bitsandbytes "
                              "(or choose optimizer: AdamW).") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **args)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        for key, value in (("relative_step", False), ("scale_parameter", False), ("warmup_init", False)):
            args.setdefault(key, value)
        return Adafactor(groups, lr=cfg.learning_rate, **args)
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer Prodigy needs the prodigyopt package: pip install prodigyopt "
                              "(or choose optimizer: AdamW).") from None
        if cfg.learning_rate < 0.1:
            logger.warning("Prodigy adapts the step size itself and expects learning_rate about 1.0; "
                           "got %g", cfg.learning_rate)
        return Prodigy(groups, lr=cfg.learning_rate, **args)
    raise ConfigError(f"unknown optimizer {name!r}")


def warmup_count(cfg: TrainConfig, total_steps: int) -> int:
    w = cfg.warmup_steps
    return int(round(w * total_steps)) if w < 1 else int(w)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if cfg.lr_scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = cfg.lr_scheduler_num_cycles
    if cfg.lr_scheduler == "polynomial":
        kwargs["power"] = cfg.lr_scheduler_power
    warmup = 0 if cfg.lr_scheduler == "constant" else warmup_count(cfg, total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, **kwargs)


def optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm: float) -> None:
    """One update from accumulated gradients: unscale (fp16), clip, step, drop the gradients, advance
    the schedule. The image and the text loops share it (their fast steps do the same inside a graph)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
