"""What a run leaves behind: the LoRA file and its metadata, checkpoints, previews, and on a stop or an
error, a checkpoint at the last finished step.

Part of `Trainer` (engine/train.py), split out by job.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import ProcessLost
from .errors import NonFiniteLoss, TrainingStopped
from .lora.ema import EMA_WEIGHTS_FILE, write_lora_with_ema
from .lora.kohya_io import save_lora
from .lora.metadata import build_metadata
from .sample import load_prompts, render_previews, save_previews

logger = logging.getLogger(__name__)
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainResult:
    lora_path: Path | None
    tensors: dict[str, torch.Tensor]  # final weights under kohya keys, in the save precision
    metadata: dict[str, str]
    steps: int
    losses: list[float] = field(default_factory=list)
    output_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    fast_steps: int = 0  # steps the fast (CUDA-graph) step took; the rest took the plain step
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss), engine/validation.py


def _every(step: int, crossed_epoch: bool, epochs_done: int, n_steps: int, n_epochs: int) -> bool:
    """Every `n_steps` steps, or every `n_epochs` epochs when this step ended one (0: never)."""
    return bool(n_steps and step % n_steps == 0) or bool(n_epochs and crossed_epoch and epochs_done % n_epochs == 0)


class RunOutput:
    """The saving half of `Trainer`."""

    def _save_due(self, step: int, crossed_epoch: bool, epochs_done: int) -> bool:
        return _every(step, crossed_epoch, epochs_done, self.cfg.save_steps, self.cfg.save_every_n_epochs)

    def _preview_due(self, step: int, crossed_epoch: bool, epochs_done: int) -> bool:
        cfg = self.cfg
        return bool(cfg.sample_prompts) and _every(step, crossed_epoch, epochs_done, cfg.sample_every_n_steps,
                                                   cfg.sample_every_n_epochs)

    def _metadata(self) -> dict[str, str]:
        summary = self.data.summary()
        summary.setdefault("num_train_images", self.data.num_train_images)
        summary.setdefault("num_reg_images", self.data.num_reg_images)
        if getattr(self, "val_data", None) is not None:
            summary["num_validation_images"] = len(self.val_data.records)
        metadata = build_metadata(self.cfg, self.model.info, data_summary=summary, steps=self.position.step,
                                  epoch=self.position.micro // self.bpe, total_steps=self.total_steps,
                                  batches_per_epoch=self.bpe, started_at=self.started_at,
                                  mixed_precision=self.precision, session_id=self.session_id,
                                  processes=self.dist.world)
        for guard in (getattr(self, "recovery", None), getattr(self, "nan_guard", None)):  # what they changed
            metadata.update(guard.metadata() if guard is not None else {})
        return metadata

    def _write_lora(self, path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
        metadata = self._metadata()
        if getattr(self, "ema", None) is not None:  # the weights' moving average, instead of or beside them
            return write_lora_with_ema(self.ema, self.cfg.ema_save, path, SAVE_DTYPES[self.cfg.save_precision],
                                       metadata)
        tensors = self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.save_precision])
        return save_lora(path, tensors, metadata), tensors, metadata

    def _save_checkpoint(self, writer: bool | None = None) -> Path | None:
        """The main process writes (`writer`: another one, when a run of several ends without it); the
        processes hold the same LoRA, optimizer and generator state, so nobody waits for this."""
        step = self.position.step
        self.saved_step = step
        # on every process: the NaN guard takes its snapshot at a checkpoint (engine/nan_guard.py)
        guards = {name: guard.state() for name in ("recovery", "nan_guard") if (guard := getattr(self, name, None))}
        if not (self.dist.is_main if writer is None else writer):
            return None
        lora_path, _, _ = self._write_lora(self.out / f"{self.cfg.output_name}-step{step:08d}.safetensors")
        folder = ckpt.save_checkpoint(
            self.ckpt_root / f"step-{step:08d}", weights=self.network.kohya_state_dict(None),
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, position=self.position,
            rng=[ckpt.rng_state(self.generator)], cfg_dict=self.dist.run_settings(self.cfg.to_dict()),
            lora_file=lora_path.name,
            more_weights={EMA_WEIGHTS_FILE: self.ema.kohya_state_dict(None)} if getattr(self, "ema", None) else None,
            guards=guards)
        ckpt.prune(self.ckpt_root, self.cfg.save_last_n_checkpoints)
        self.events.emit("checkpoint", step=step, path=str(folder), lora_path=str(lora_path))
        return folder

    def _preview(self, step: int) -> None:
        if not self.dist.is_main:
            return
        prompts = load_prompts(self.cfg)
        try:
            with self.parking.awake() if getattr(self, "parking", None) is not None else contextlib.nullcontext():
                images = render_previews(self.model, prompts, self.cfg,
                                         self.data.summary().get("resolution", (512, 512)), self.cfg.trigger_word)
        except torch.cuda.OutOfMemoryError:
            # sampling needs the encoders back and its own activations on top of the training state; a
            # preview that does not fit is skipped, the run goes on (nothing of the training is lost)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            message = (f"preview at step {step} skipped: out of memory on {self.device} while sampling (training "
                       f"goes on). Lower the preview size or steps (--w/--h/--s in the prompt), or preview less "
                       f"often.")
            if not any(w.startswith("preview at step") for w in self.warnings):  # the first one is enough
                self.warnings.append(message)
            self.events.emit("info", message=message)
            return
        if images:
            save_previews(images, self.out / "samples", step)
            self.events.emit("preview", step=step, images=images, prompts=[p.prompt for p in prompts])

    def _finish(self) -> TrainResult:
        fast_steps = self.fast.steps if getattr(self, "fast", None) is not None else 0
        if not self.dist.is_main:
            tensors = self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.save_precision])
            return TrainResult(lora_path=None, tensors=tensors, metadata={}, steps=self.position.step,
                               losses=self.losses, output_dir=self.out, warnings=self.warnings,
                               fast_steps=fast_steps)
        path, tensors, metadata = self._write_lora(self.out / f"{self.cfg.output_name}.safetensors")
        if (unchanged := self.change_check.warning(self.network, self.position.step)) is not None:
            self.warnings.append(unchanged)
            self.events.emit("info", message=unchanged)
        from .plot import loss_plot

        validation = list(getattr(self, "validation", []))
        loss_plot(self.losses, title=f"{self.cfg.output_name}: loss per step",
                  validation=validation).save(self.out / "loss.png")
        # the LoRA is on disk: free the optimizer and graphs before the encoders come back to the GPU
        # (final preview, unparking), or that moment would be the run's memory peak
        self._release()
        if self.cfg.sample_prompts and not self._preview_due(self.position.step, True, 0):
            self._preview(self.position.step)
        self.events.emit("done", step=self.position.step, total_steps=self.total_steps, path=str(path))
        return TrainResult(lora_path=path, tensors=tensors, metadata=metadata, steps=self.position.step,
                           losses=self.losses, output_dir=self.out, warnings=self.warnings, fast_steps=fast_steps,
                           validation=validation)

    def _abort(self, exc: BaseException) -> None:
        """Keep what the run made: a checkpoint at the last finished step, unless the weights are bad."""
        if isinstance(exc, NonFiniteLoss) or not hasattr(self, "optimizer"):
            self.events.emit("error", step=self.position.step, message=str(exc))
            return
        folder = None
        if getattr(self, "step_end", None) is not None:  # ended inside a step: keep the last finished one
            self.position, generator_state = self.step_end
            self.generator.set_state(generator_state)
        if self.position.step > self.saved_step:
            try:  # several processes: each survivor writes (the main one may be the one that died)
                folder = self._save_checkpoint(writer=True)
            except Exception as save_exc:  # never hide the original error behind a failed save
                logger.error("could not save a checkpoint after the run stopped: %s", save_exc)
        if folder is None and self.position.step:
            found = ckpt.checkpoint_dirs(self.ckpt_root)
            folder = found[-1] if found else None
        if isinstance(exc, ProcessLost):
            exc.checkpoint = str(folder) if folder else None
        if isinstance(exc, (TrainingStopped, KeyboardInterrupt, *self.stop_exceptions)):
            if isinstance(exc, TrainingStopped):
                exc.checkpoint = str(folder) if folder else None
            self.events.emit("stopped", step=self.position.step, path=str(folder) if folder else None,
                             message=f"stopped at step {self.position.step}; checkpoint kept in {folder}" if folder
                             else "stopped before the first step")  # each host adds how to resume there
        else:
            self.events.emit("error", step=self.position.step, message=str(exc),
                             path=str(folder) if folder else None)
