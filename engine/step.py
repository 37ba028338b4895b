"""The training step: one micro-batch -> its loss and gradients, the same on every path.

    drawn = step.draw(batch)                      # noise and timesteps, from the run's generator
    tensors = step.tensors(batch, drawn)          # one flat dict of tensors: latents, loss weights,
                                                  #   the draws, "cond.<role>" conditioning
    loss = step.loss(tensors)                     # objective -> denoiser -> loss (no Python state)

The plain step (`forward_backward`) runs these three eagerly; the CUDA-graph step (fast_step.py) draws
on the host, copies `tensors` into static buffers of the same keys and replays `loss` with backward and
the optimizer captured around it; `torch_compile: true` compiles `loss` (compiled_loss.py), or the
family's blocks where its forward compiles them (FamilySpec.compile_blocks: Flux.1). A family
with other inputs (another conditioning role, a guidance value, position ids) or an objective with
other draws adds keys to the dict, and every path carries them without new code.
"""

from __future__ import annotations

from typing import Callable

import torch

from .objectives import Objective
from .runtime import autocast

COND = "cond."  # key prefix of conditioning tensors in the step's dict


class TrainingStep:
    def __init__(self, *, model, network, objective: Objective, generator: torch.Generator,
                 precision: str, use_autocast: bool, cast_dtype: torch.dtype | None):
        """`model`: the seam's TrainableModel (engine/model.py); `network`: its attached LoRANetwork."""
        self.model, self.network, self.objective, self.generator = model, network, objective, generator
        self.device = model.device
        self.precision, self.use_autocast = precision, use_autocast
        self.cast_dtype = cast_dtype  # LoRA weights cast once per step (None: each layer casts as it runs)
        self.batch_conditioning = model.info.spec.batch_conditioning
        self._loss: Callable[[dict], torch.Tensor] = self.plain_loss

    def compile(self, backend: str, devices: tuple[str, ...], say: Callable[[str], None]) -> None:
        """`torch_compile: true`: compile `loss` where it can be (compiled_loss.py says when)."""
        from .compiled_loss import loss_for_run

        self._loss = loss_for_run(self.plain_loss, self.device, say, backend=backend, devices=devices)

    def close(self) -> None:
        """The run's end: the compiled loss's graphs go with it (compiled_loss.py says why)."""
        release = getattr(self._loss, "release", None)
        if release is not None:
            release()

    # --- the three parts ----------------------------------------------------------------------------
    def draw(self, batch) -> dict[str, torch.Tensor]:
        """The step's random draws (the same ones, in the same order, on every path); with several
        processes, this process's slice of the global batch's draws (engine/data/shards.py)."""
        x0 = batch.latents.to(self.device, torch.float32)
        share = getattr(batch, "share", None)
        return self.objective.draw(x0, self.generator) if share is None else share.draw(self.objective, x0, self.generator)

    def tensors(self, batch, drawn: dict[str, torch.Tensor], cond: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """Everything `loss` reads, as one flat dict on the device: the batch, the draws, the conditioning
        (`cond`, or the batch's cached one) and the family's conditioning taken from the batch."""
        dev = self.device
        cond = batch.cond if cond is None else cond
        out = {"latents": batch.latents.to(dev, torch.float32), "loss_weights": batch.loss_weights.to(dev), **drawn}
        if getattr(batch, "masks", None) is not None:  # masked_loss: per-pixel weights at the latents' size
            out["loss_mask"] = batch.masks.to(dev, torch.float32)
        out.update({COND + k: v.to(dev) for k, v in cond.items()})
        out.update({COND + k: getattr(batch, k).to(dev) for k in self.batch_conditioning})
        return out

    def loss(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(tensors)

    def plain_loss(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's noisy input, the denoiser's prediction under the run's autocast, the loss."""
        model = self.model
        noised = self.objective.noised(tensors["latents"], tensors)
        cond = {k[len(COND):]: v for k, v in tensors.items() if k.startswith(COND)}
        with autocast(self.device, self.precision, self.use_autocast):
            prediction = model.predict(noised.noisy.to(model.dtype), noised.timestep, cond)
        return self.objective.loss(prediction, noised, tensors["loss_weights"], tensors.get("loss_mask"))

    # --- the plain step ---------------------------------------------------------------------------------
    def forward_backward(self, batch, accum: int, scaler=None, *, drawn: dict[str, torch.Tensor] | None = None,
                         share: float = 1.0) -> torch.Tensor:
        """One micro-batch eagerly, text encoded here when it is not cached (text-encoder training);
        the gradients of loss / accum accumulate in the LoRA weights. With several processes the loss
        is weighted by this process's share of the global batch (the processes' parts are summed).
        `drawn` and `share`: a part of a batch split after an out-of-memory error
        (engine/memory/recovery.py), with its slice of the batch's draws and its share of the batch."""
        drawn = self.draw(batch) if drawn is None else drawn
        with self.network.cast_weights(self.cast_dtype):
            cond = batch.cond
            if cond is None:
                with autocast(self.device, self.precision, self.use_autocast):
                    cond = self.model.encode_text(batch.captions)
            loss = self.loss(self.tensors(batch, drawn, cond))
            process_share = getattr(batch, "share", None)
            if process_share is not None:
                loss = loss * process_share.weight
            scaled = loss / accum if share == 1.0 else loss * share / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss
