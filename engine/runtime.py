"""Device and precision: what `device: auto` and `mixed_precision: auto` mean on this machine.

fp16 runs with a GradScaler and fp32 LoRA master weights; bf16 needs no scaler; both autocast the
forward pass. On the CPU the run is fp32 (CPU autocast is slower than fp32 for these models).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but this PyTorch build sees no CUDA GPU; "
                          f"use device: cpu or install a CUDA build of torch.")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """'no' | 'fp16' | 'bf16' for this device."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "mps":
            return "fp16"
        return "no"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision bf16 is not supported by this GPU; use fp16 (or auto).")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast(device: torch.device, precision: str, enabled: bool = True):
    if precision == "no" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))


def grad_scaler(device: torch.device, precision: str):
    if precision != "fp16" or device.type not in ("cuda", "cpu"):
        return None
    return torch.amp.GradScaler(device.type)


def noise_seed(seed: int) -> int:
    """The seed of a run's noise/timestep stream, derived from its seed so that it is not the stream the
    LoRA's initial weights are drawn from (`torch.manual_seed(seed)`): two generators seeded alike give
    the same numbers, so the first steps' noise would be correlated with the initial weights."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63
