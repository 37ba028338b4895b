"""The step loop of a run: batches in, optimizer steps out, the loss read back without stalling the GPU.

Part of `Trainer` (engine/train.py), split out by job. Each micro-batch goes through the fast step
(CUDA graph) when there is one and it takes the batch, else through the plain training step; after
`gradient_accumulation_steps` micro-batches the optimizer steps. The loss stays on the device and is
read back about twice a second on a GPU (every step on the CPU), so the host does not wait on the GPU
every step. A non-finite update is the NaN guard's (engine/nan_guard.py: skipped, checked with one sync
per update on the plain step), an out-of-memory error inside a step the recovery's
(engine/memory/recovery.py).
"""

from __future__ import annotations

import time

import torch

from . import checkpoint as ckpt
from .data.prefetch import Prefetch
from .errors import TrainingStopped
from .fast_step import host_lrs
from .optim import optimizer_step


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
        self._mark_step_end()
        while pos.step < self.total_steps:
            epoch, index = divmod(pos.micro, self.bpe)
            if epoch != plan_epoch:
                plan, plan_epoch = self.data.epoch_plan(epoch), epoch
            if not in_window:
                self.recovery.mark(pos.micro)  # where an out-of-memory retry of this step starts
                self.watchdog.start()
            try:
                with self.watchdog.loading():
                    batch = self._batch(prefetch, plan, epoch, index)
                last = (pos.micro + 1) % accum == 0 or pos.micro + 1 >= self.total_micro
                self.recovery.maybe_inject(last)
                loss, stepped = self._micro_step(batch, accum)
                window = window + loss.detach()
                in_window += 1
                pos.micro += 1
                if not last:
                    continue
                if stepped:
                    self.fast.scheduler_step()
                else:  # several processes: gradients and losses summed first, so every guard decides alike
                    window = self.dist.reduce_step(self.params, window)
                    if self.nan_guard.allows_update(window):  # engine/nan_guard.py: a NaN update is skipped
                        self._update()
                    else:
                        self.scheduler.step()
            except torch.cuda.OutOfMemoryError as exc:  # engine/memory/recovery.py: free, change the plan, retry
                batch = loss = None
                pos.micro = self.recovery.recover(exc)
                window, in_window = torch.zeros((), device=self.device), 0
                continue
            pos.step += 1
            if self.ema is not None:
                self.ema.update(pos.step)
            self._mark_step_end()
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
            self.watchdog.end(pos.step)  # a step far slower than usual is reported (engine/watchdog.py)
            if self.events.should_stop():
                raise TrainingStopped("stopped by the user")
            crossed_epoch = (pos.micro // self.bpe) > ((pos.micro - accum) // self.bpe)
            if pos.step < self.total_steps and self._save_due(pos.step, crossed_epoch, pos.micro // self.bpe):
                self._save_checkpoint()
            if self._preview_due(pos.step, crossed_epoch, pos.micro // self.bpe):
                self._preview(pos.step)
            if self._validation_due(pos.step, crossed_epoch, pos.micro // self.bpe):
                self._validate(pos.step)

    def _mark_step_end(self) -> None:
        """Where the last finished step left the data stream and the draws: a run that ends inside a
        step (a dead process, Ctrl-C between accumulated micro-batches) checkpoints this point."""
        self.step_end = (ckpt.Position(self.position.step, self.position.micro), self.generator.get_state())

    def _micro_step(self, batch, accum: int) -> tuple[torch.Tensor, bool]:
        """One micro-batch: (its loss, whether the fast step also took the optimizer step)."""
        if self.fast is not None:
            loss = self.fast.step(batch)
            if loss is not None:
                return self.nan_guard.maybe_inject(loss, fast=True), True
        if self.recovery.split > 1:
            loss = self.recovery.forward_backward(batch, accum, self.scaler)
        else:
            loss = self.step.forward_backward(batch, accum, self.scaler)
        return self.nan_guard.maybe_inject(loss, fast=False), False

    def _update(self) -> None:
        """One optimizer step on gradients already summed over the processes (`dist.reduce_step`)."""
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.params, self.cfg.max_grad_norm)

    def _flush(self, pending: list[tuple[int, torch.Tensor]]) -> list[tuple[int, float]]:
        if not pending:
            return []
        values = torch.stack([v for _, v in pending]).float().cpu().tolist()
        reported = self.nan_guard.check_read_back([(s, v) for (s, _), v in zip(pending, values)])
        self.losses.extend(v for _, v in reported)
        return reported
