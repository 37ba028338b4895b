"""Non-finite steps: not applied, and a run that keeps producing them is brought back instead of lost.

The plain step checks each update before the optimizer takes it: a loss or gradient that is NaN or
infinite skips the update (the gradients are dropped; the schedule still advances with the step
count). After `nan_guard_steps` such steps in a row the run restores the last good LoRA state (LoRA
weights and optimizer state, kept in CPU memory every `SNAPSHOT_EVERY` good steps), and then either
switches fp16 to bf16 where the device has bf16 (fp16's range is the usual cause) or halves the
learning rate, says which, and continues. The CUDA-graph step applies its update inside the graph, so
a non-finite loss is only seen when the losses are read back (about twice a second): the run restores
the last good state then, and continues on the plain step, where each update is checked.
`nan_guard_steps: 0` turns the guard off: the first non-finite loss ends the run as before.

Checkpoints keep what the guard did (`state`): its counts, its actions and the fp16 -> bf16 switch; a
resumed run switches again before its first step (`resume`). A halved learning rate needs nothing
more: the optimizer's and the scheduler's state in the checkpoint hold it. The last good LoRA state is
the checkpoint's own where that is a good state, else kept in it (`state` says when).
"""

from __future__ import annotations

import logging
import math

import torch

from .errors import NonFiniteLoss

logger = logging.getLogger(__name__)
SNAPSHOT_EVERY = 50  # good optimizer steps between snapshots of the LoRA state (a copy to CPU memory)
BF16_ACTION = "switched from fp16 to bf16 (same speed, fp32's range)"
MAX_RESTORES = 3  # restores without one good step between them: the cause is not the LoRA, the run stops


class NanGuard:
    def __init__(self, trainer):
        self.trainer = trainer
        self.limit = trainer.cfg.nan_guard_steps
        self.in_a_row = 0
        self.skipped = 0
        self.actions: list[str] = []
        self._good_since = 0
        self._restores = 0  # since the last good step
        self._snapshot, self._snapshot_step = None, 0
        if self.limit:
            self.snapshot()

    @property
    def on(self) -> bool:
        return self.limit > 0

    def maybe_inject(self, loss: torch.Tensor, fast: bool) -> torch.Tensor:
        """Test hook (EngineOptions.inject_nan_at): this step's loss and gradients (or, after the CUDA-graph
        step's update, the LoRA weights) become NaN."""
        t = self.trainer
        if t.position.step + 1 not in t.options.inject_nan_at:
            return loss
        with torch.no_grad():
            for p in t.params:
                target = p if fast else p.grad
                if target is not None:
                    target.fill_(float("nan"))
        return loss * float("nan")

    # --- the plain step ---------------------------------------------------------------------------------
    def allows_update(self, loss: torch.Tensor) -> bool:
        """True when this update's loss and gradients are finite (one host sync per update); otherwise
        the gradients are dropped and the step counts as skipped."""
        if not self.on:
            return True
        t = self.trainer
        grads = [p.grad for p in t.params if p.grad is not None]
        checks = [torch.isfinite(loss.detach().float()).all()]
        if t.scaler is None and grads:  # a GradScaler skips overflowing fp16 gradients itself
            checks.append(torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all())
        if bool(torch.stack(checks).all()):
            self._good()
            return True
        t.optimizer.zero_grad(set_to_none=True)
        self._bad(t.position.step + 1, "its loss or gradients are not finite; the update was skipped")
        return False

    # --- losses read back (the CUDA-graph step) ---------------------------------------------------------
    def check_read_back(self, reported: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """The finite losses of those read back; a non-finite one from the CUDA-graph step restores the
        last good state and moves the run to the plain step. Off: the first one ends the run."""
        bad = [(s, v) for s, v in reported if not math.isfinite(v)]
        if not bad:
            return reported
        if not self.on:
            raise NonFiniteLoss(self._stop_text(*bad[0]))
        t = self.trainer
        if t.fast is not None:  # the graph applied those updates: undo them
            t.fast.close()
            t.fast = None
            self._restore(f"the loss became {bad[0][1]} at step {bad[0][0]} in the CUDA-graph step, whose "
                          f"updates cannot be skipped; the run goes on with the plain step, which checks each update")
        return [(s, v) for s, v in reported if math.isfinite(v)]

    # --- what happens -----------------------------------------------------------------------------------
    def _good(self) -> None:
        self.in_a_row = self._restores = 0
        self._good_since += 1
        if self._good_since >= SNAPSHOT_EVERY:
            self.snapshot()

    def _bad(self, step: int, why: str) -> None:
        self.in_a_row += 1
        self.skipped += 1
        self._say(f"step {step}: {why} ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            self.in_a_row = 0
            if self._restores >= MAX_RESTORES:
                raise NonFiniteLoss(self._stop_text(step, float("nan")) + f" The NaN guard restored the last good "
                                    f"LoRA state {MAX_RESTORES} times ({'; '.join(self.actions)}) without one "
                                    f"finite step since: the model or the data gives NaN, not the LoRA.")
            self._restore(f"{self.limit} non-finite steps in a row")

    def _restore(self, why: str) -> None:
        t = self.trainer
        self._restores += 1
        if self._snapshot is not None:
            weights, state = self._snapshot
            with torch.no_grad():
                for p, saved in zip(t.params, weights):
                    p.copy_(saved)
            t.optimizer.load_state_dict(state)
        t.optimizer.zero_grad(set_to_none=True)
        action = self._act()
        self.actions.append(action)
        self._say(f"{why}: restored the LoRA state of step {self._snapshot_step}; {action}")

    def _act(self) -> str:
        """fp16 -> bf16 where the device computes bf16, else half the learning rate."""
        t = self.trainer
        if t.precision == "fp16" and self._bf16_possible():
            self._to_bf16()
            return BF16_ACTION
        t.scheduler.base_lrs = [lr * 0.5 for lr in t.scheduler.base_lrs]
        for group in t.optimizer.param_groups:
            group["lr"] = group["lr"] * 0.5
            if "initial_lr" in group:
                group["initial_lr"] *= 0.5
        return f"learning rate halved (now {t.scheduler.base_lrs[0]:.3g})"

    def _bf16_possible(self) -> bool:
        return self.trainer.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def _to_bf16(self) -> None:
        t = self.trainer
        t.precision = t.step.precision = "bf16"
        t.scaler = None
        t.step.use_autocast = True
        if t.step.cast_dtype is not None:
            t.step.cast_dtype = torch.bfloat16

    # --- checkpoints ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps. A checkpoint at a good step of the plain step is a snapshot point: the
        state a run resumed from it starts with is the one it would go back to. Otherwise (inside a run of
        non-finite steps, or on the CUDA-graph step, whose updates are checked late) the snapshot goes into
        the checkpoint, so a restore after resuming goes back where the uninterrupted run would."""
        t = self.trainer
        out = {"skipped": self.skipped, "in_a_row": self.in_a_row, "restores": self._restores,
               "actions": list(self.actions), "bf16": BF16_ACTION in self.actions}
        if self.on and self.in_a_row == 0 and t.fast is None:
            self.snapshot()
        elif self.on and self._snapshot is not None:
            weights, optimizer = self._snapshot
            out["snapshot"] = {"step": self._snapshot_step, "weights": weights, "optimizer": optimizer}
        out["good_since"] = self._good_since
        return out

    def resume(self, state: dict | None) -> None:
        """A checkpoint's guard state; the fp16 -> bf16 switch made again (said, like the first time)."""
        if not state:
            return
        self.skipped, self.in_a_row, self._restores = state["skipped"], state["in_a_row"], state["restores"]
        self.actions = list(state["actions"])
        self._good_since = state["good_since"]
        if "snapshot" in state:
            saved = state["snapshot"]
            self._snapshot, self._snapshot_step = (list(saved["weights"]), saved["optimizer"]), saved["step"]
        if state["bf16"] and self.trainer.precision == "fp16":
            if self._bf16_possible():
                self._to_bf16()
                self._say("resumed in bf16: the run had switched from fp16 to bf16 before the checkpoint")
            else:
                self._say(f"the run had switched from fp16 to bf16 before the checkpoint, but {self.trainer.device} "
                          f"does not compute bf16: resumed in fp16")

    def snapshot(self) -> None:
        """The LoRA weights and optimizer state now, in CPU memory."""
        t = self.trainer
        weights = [p.detach().to("cpu", copy=True) for p in t.params]
        state = t.optimizer.state_dict()
        state = {"state": {k: {n: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
                               for n, v in s.items()} for k, s in state["state"].items()},
                 "param_groups": [dict(g) for g in state["param_groups"]]}
        self._snapshot, self._snapshot_step, self._good_since = (weights, state), t.position.step, 0

    def _say(self, message: str) -> None:
        logger.warning(message)
        self.trainer.events.emit("info", message=f"NaN guard: {message}")

    def _stop_text(self, step: int, value: float) -> str:
        from . import checkpoint as ckpt

        t = self.trainer
        last = ckpt.checkpoint_dirs(t.ckpt_root)
        where = f"The last good checkpoint is {last[-1]}." if last else "No checkpoint was written yet."
        return (f"the loss became {value} at step {step}. {where} Common causes: fp16 overflow (try "
                f"mixed_precision: bf16, or no), a learning rate that is too high (now {t.cfg.learning_rate}), "
                f"or a broken image/VAE (NaN latents).")

    def metadata(self) -> dict[str, str]:
        if not self.skipped and not self.actions:
            return {}
        import json

        return {"inplace_lora_nan_guard": json.dumps({"skipped_steps": self.skipped, "actions": self.actions})}
