"""The validation loss: the training objective on images the LoRA never trains on, at fixed timesteps
and noise, so that its curve tells learning apart from overfitting (the training loss keeps falling
when the LoRA memorises; the validation loss turns up).

The images are `validation_data_dir` or the `validation_split` fraction held out of the training images
(engine/data/validation_split.py). Each is read at its centre crop without flips and with its plain
caption (trigger word first, no shuffle or dropout), its latent and text encoded once. Every evaluation
runs each batch at kohya's four timesteps (200, 400, 600, 800 of 1000; sigma = t/1000 for flow models)
with noise from a generator seeded by `validation_seed` (or `seed`), the batch and the timestep: the
same draws at every evaluation and in every run with that seed, so two values differ only because the
LoRA did. It is the training step's own loss (engine/step.py), without gradients and LoRA dropout.

Part of `Trainer` (engine/train.py): `_setup_validation`, `_validation_due`, `_validate`; the values go
out as "validation" events (TensorBoard's loss/validation, the plots) and into `TrainResult.validation`.
"""

from __future__ import annotations

import contextlib

import torch

from .runtime import autocast

TIMESTEPS = (200, 400, 600, 800)  # kohya's: linspace(0, 1000, 6)[1:-1]


def validation_config(cfg):
    """The config the validation images are read with: no augmentation, no caption randomness, no
    regularisation images, latents and text cached in memory."""
    return cfg.replace(train_data_dir=cfg.validation_data_dir or cfg.train_data_dir, reg_data_dir="", repeats=1,
                       flip_aug=False, random_crop=False, color_jitter=0.0, shuffle_caption=False,
                       caption_dropout=0.0, caption_tag_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                       cache_latents="memory", metadata_path="" if cfg.validation_data_dir else cfg.metadata_path)


def fixed_draws(step, latents: torch.Tensor, seed: int, batch: int, timestep: int) -> dict[str, torch.Tensor]:
    """The objective's draws for one validation batch at one timestep, the same at every call."""
    generator = torch.Generator(device=step.device).manual_seed(seed * 1_000_003 + batch * 1009 + timestep)
    drawn = step.objective.draw(latents, generator)
    n = latents.shape[0]
    if "t" in drawn:
        drawn["t"] = torch.full((n,), timestep, dtype=drawn["t"].dtype, device=latents.device)
    if "sigma" in drawn:
        drawn["sigma"] = torch.full((n,), timestep / 1000, dtype=drawn["sigma"].dtype, device=latents.device)
    return drawn


@torch.no_grad()
def validation_loss(step, data, seed: int, max_batches: int = 0) -> float:
    """The mean loss over the validation batches and timesteps (see the module docstring)."""
    model, network = step.model, step.network
    plan = data.epoch_plan(0)
    if max_batches:
        plan = plan[:max_batches]
    training = network.training
    network.eval()  # no LoRA dropout
    total, count = 0.0, 0
    try:
        with network.cast_weights(step.cast_dtype):
            for index, batch_plan in enumerate(plan):
                batch = data.materialize(batch_plan, model, epoch=0)
                cond = batch.cond
                if cond is None:
                    with autocast(step.device, step.precision, step.use_autocast):
                        cond = model.encode_text(batch.captions)
                for timestep in TIMESTEPS:
                    drawn = fixed_draws(step, batch.latents.to(step.device, torch.float32), seed, index, timestep)
                    total += float(step.plain_loss(step.tensors(batch, drawn, cond)))
                    count += 1
    finally:
        network.train(training)
    return total / max(count, 1)


class ValidationRun:
    """The validation half of `Trainer`."""

    def _setup_validation(self) -> None:
        cfg = self.cfg
        self.validation: list[tuple[int, float]] = []
        self.val_data = None
        held = getattr(self.data, "held_out", set())
        if not cfg.validation_data_dir and not held:
            if cfg.validation_split > 0:
                self.events.emit("info", message="validation_split: too few training images to hold one out; "
                                                 "no validation loss")
            return
        from .data.train_data import TrainData

        spec = self.model.info.spec
        self.val_data = TrainData(validation_config(cfg), native_resolution=self.model.info.resolution,
                                  model_key=getattr(self.data, "model_key", ""), train_text_encoder=cfg.train_text_encoder,
                                  max_bucket_reso=spec.max_bucket_reso, only=held or None)
        self.val_data.prepare_cache(self.model)
        self.events.emit("info", message=f"validation loss on {len(self.val_data.records)} images "
                                         f"({'held out' if held else cfg.validation_data_dir})")

    def _validation_due(self, step: int, crossed_epoch: bool, epochs_done: int) -> bool:
        from .run_output import _every

        cfg = self.cfg
        return self.val_data is not None and (step == self.total_steps or _every(
            step, crossed_epoch, epochs_done, cfg.validate_every_n_steps, cfg.validate_every_n_epochs))

    def _validate(self, step: int) -> float:
        cfg = self.cfg
        seed = cfg.validation_seed if cfg.validation_seed >= 0 else cfg.seed
        parking = getattr(self, "parking", None)
        text_needed = parking is not None and not self.val_data.text_cache_enabled
        with parking.awake() if text_needed else contextlib.nullcontext():
            value = validation_loss(self.step, self.val_data, seed, cfg.max_validation_steps)
        self.validation.append((step, value))
        self.events.emit("validation", step=step, total_steps=self.total_steps, loss=value,
                         losses=list(self.validation))
        return value
