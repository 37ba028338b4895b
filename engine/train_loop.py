"""The step loop of a run: batches in, optimizer steps out, the loss read back without stalling the GPU.

Part of `Trainer` (engine/train.py), split out by job. Each micro-batch goes through the fast step
(CUDA graph) when there is one and it takes the batch, else through the plain training step; after
`gradient_accumulation_steps` micro-batches the optimizer steps. The loss stays on the device and is
read back about twice a second on a GPU (every step on the CPU), so the host does not wait on the GPU
every step; a non-finite loss stops the run with advice.
"""

from __future__ import annotations

import math
import time

import torch

from . import checkpoint as ckpt
from .data.prefetch import Prefetch
from .errors import NonFiniteLoss, TrainingStopped
from .fast_step import host_lrs


class TrainingLoop:
    """The loop half of `Trainer`: needs its data, step, fast step, optimizer, scheduler and position."""

    def _loop(self) -> None:
        prefetch = Prefetch(self.data, enabled=self.device.type == "cuda" and self.data.reads_per_step())
        try:
            self._steps(prefetch)
        finally:
            prefetch.close()

    def _batch(self, prefetch: Prefetch, plan, epoch: int, index: int):
        """This micro-batch on the device; the next one's host work starts in the background first."""
        host = prefetch.get(plan, epoch, index)
        following = self.position.micro + 1
        if following < self.total_micro:
            e, i = divmod(following, self.bpe)
            prefetch.ahead(plan if e == epoch else self.data.epoch_plan(e), e, i)
        return self.data.to_device(host, self.model)

    def _steps(self, prefetch: Prefetch) -> None:
        cfg, pos = self.cfg, self.position
        accum = cfg.gradient_accumulation_steps
        plan_epoch, plan = -1, []
        pending: list[tuple[int, torch.Tensor]] = []
        last_flush = time.monotonic()
        window = torch.zeros((), device=self.device)
        in_window = 0
        while pos.step < self.total_steps:
            epoch, index = divmod(pos.micro, self.bpe)
            if epoch != plan_epoch:
                plan, plan_epoch = self.data.epoch_plan(epoch), epoch
            batch = self._batch(prefetch, plan, epoch, index)
            loss = self.fast.step(batch) if self.fast is not None else None
            stepped = loss is not None
            if not stepped:
                loss = self.step.forward_backward(batch, accum, self.scaler)
            window = window + loss.detach()
            in_window += 1
            pos.micro += 1
            if pos.micro % accum and pos.micro < self.total_micro:
                continue
            if stepped:
                self.fast.scheduler_step()
            else:
                self._update()
            pos.step += 1
            pending.append((pos.step, window / in_window))
            window, in_window = torch.zeros((), device=self.device), 0
            now = time.monotonic()
            flush = self.device.type == "cpu" or now - last_flush >= 0.5 or pos.step == self.total_steps
            reported = self._flush(pending) if flush else []
            if flush:
                pending, last_flush = [], now
            lr = self.fast.lr() if self.fast is not None else host_lrs(self.scheduler, self.optimizer)[0]
            self.events.emit("step", step=pos.step, total_steps=self.total_steps, epoch=pos.micro // self.bpe,
                             lr=lr, loss=reported[-1][1] if reported else None, losses=reported)
            if self.events.should_stop():
                raise TrainingStopped("stopped by the user")
            crossed_epoch = (pos.micro // self.bpe) > ((pos.micro - accum) // self.bpe)
            if pos.step < self.total_steps and self._save_due(pos.step, crossed_epoch, pos.micro // self.bpe):
                self._save_checkpoint()
            if self._preview_due(pos.step, crossed_epoch, pos.micro // self.bpe):
                self._preview(pos.step)

    def _update(self) -> None:
        self.dist.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _flush(self, pending: list[tuple[int, torch.Tensor]]) -> list[tuple[int, float]]:
        if not pending:
            return []
        values = torch.stack([v for _, v in pending]).float().cpu().tolist()
        reported = [(s, v) for (s, _), v in zip(pending, values)]
        for step, value in reported:
            if not math.isfinite(value):
                last = ckpt.checkpoint_dirs(self.ckpt_root)
                where = f"The last good checkpoint is {last[-1]}." if last else "No checkpoint was written yet."
                raise NonFiniteLoss(f"the loss became {value} at step {step}. {where} Common causes: fp16 "
                                    f"overflow (try mixed_precision: bf16, or no), a learning rate that is too "
                                    f"high (now {self.cfg.learning_rate}), or a broken image/VAE (NaN latents).")
        self.losses.extend(v for _, v in reported)
        return reported
