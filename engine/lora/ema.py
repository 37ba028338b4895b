"""An exponential moving average of the LoRA weights (`ema_decay`, `ema_start_step`, `ema_save`).

After every optimizer step s the average e follows the trained weights w:

    e_0 = w_0 (the initial weights)
    e_s = w_s                                   for s <= ema_start_step (the average starts there)
    e_s = decay * e_{s-1} + (1 - decay) * w_s   after it

An average of the last ~1/(1-decay) steps is smoother than the last step's weights (it forgets the noise
of the final updates), which is why OneTrainer and diffusers offer it. The average lives in float32 on the
weights' device and is updated with one fused lerp, after the plain step and after a CUDA-graph replay
alike (it reads the weights the graph updated in place). A checkpoint keeps it, so a resumed run
continues the same average; the LoRA file is written from the average instead of, or beside, the plain
weights (`ema_save`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .kohya_io import save_lora
from .network import LoRANetwork

EMA_WEIGHTS_FILE = "ema_fp32.safetensors"  # in a checkpoint folder, beside the plain weights


class LoRAEma:
    def __init__(self, network: LoRANetwork, decay: float, start_step: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be between 0 and 1, got {decay}")
        self.network, self.decay, self.start_step = network, float(decay), int(start_step)
        self.params = list(network.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Called once after optimizer step `step` (1-based) has changed the weights."""
        current = [p.detach().float() for p in self.params]
        if step <= self.start_step:
            torch._foreach_copy_(self.shadow, current)
        else:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The network holds the average for the block (to write a file from it), then its own weights."""
        kept = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)
        try:
            yield self.network
        finally:
            for p, k in zip(self.params, kept):
                p.copy_(k)

    def kohya_state_dict(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        with self.swapped_in():  # copies: a float32 CPU state dict holds views of the weights swapped back after
            return {k: v.clone() for k, v in self.network.kohya_state_dict(dtype).items()}

    @torch.no_grad()
    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Take the average from a checkpoint's EMA weights (kohya keys, as `kohya_state_dict` wrote them)."""
        with self.swapped_in():
            self.network.load_kohya_state_dict(sd)
            for e, p in zip(self.shadow, self.params):
                e.copy_(p)


def ema_path(path: Path) -> Path:
    """`my_lora.safetensors` -> `my_lora_ema.safetensors` (ema_save: beside)."""
    return path.with_name(f"{path.stem}_ema{path.suffix}")


def write_lora_with_ema(ema: LoRAEma, mode: str, path: Path, dtype: torch.dtype, metadata: dict[str, str]
                        ) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """Write the run's LoRA as `ema_save` says; returns what the plain write returns (path, tensors,
    metadata) for the file at `path`."""
    averaged = {**metadata, "ss_ema": "True"}
    if mode == "instead":
        tensors = ema.kohya_state_dict(dtype)
        return save_lora(path, tensors, averaged), tensors, averaged
    save_lora(ema_path(path), ema.kohya_state_dict(dtype), averaged)
    tensors = ema.network.kohya_state_dict(dtype)
    return save_lora(path, tensors, metadata), tensors, metadata


def resume_ema(ema: LoRAEma, folder: Path) -> str:
    """Continue the checkpoint's average; one without one (EMA turned on at the resume) starts it from the
    resumed weights. Returns a line for the log."""
    from safetensors.torch import load_file

    file = folder / EMA_WEIGHTS_FILE
    if file.is_file():
        ema.load_kohya_state_dict(load_file(str(file)))
        return "the weights' moving average (EMA) continues from the checkpoint"
    with torch.no_grad():
        torch._foreach_copy_(ema.shadow, [p.detach().float() for p in ema.params])
    return "the checkpoint has no moving average (EMA): it starts from the resumed weights"
