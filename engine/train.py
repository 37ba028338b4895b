"""The training loop, the same for every host.

`train(cfg, model)` attaches LoRA hooks to the model (a host's loaded model or one loaded from
`cfg.base_model`), trains, writes the kohya file and returns it. Whatever ends the run (done, Cancel,
Ctrl-C, an exception, a NaN) the hooks come off and the host's model is left as it was; a stop keeps a
checkpoint to resume from. The hot path keeps the loss on the device and reads it back about twice a
second on a GPU, so the host does not wait on the GPU every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .compiled_loss import loss_for_run
from .config import TrainConfig, dump_config
from .distributed import Distributed
from .errors import NonFiniteLoss, TrainingStopped, UserError
from .events import Callbacks
from .encoder_parking import EncoderParking
from .data.prefetch import Prefetch
from .fast_step import FastStep, host_lrs, unsupported_reason
from .lora.kohya_io import read_lora, save_lora, to_network_keys
from .lora.metadata import build_metadata
from .lora.network import LoRANetwork
from .lora.targets import build_network
from .lora.variants import check_file_type
from .loss import add_noise, diffusion_loss
from .model import TrainableModel
from .models.fp8_compute import fp8_compute
from .models.geglu import lean_geglu
from .optim import build_optimizer, build_scheduler, param_groups
from .run_inputs import load_inputs
from .runtime import autocast, compute_dtype, grad_scaler
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


def train(cfg: TrainConfig, model: TrainableModel | None = None, *, callbacks=(), data=None) -> TrainResult:
    """Train a LoRA as `cfg` says; see the module docstring for what happens on every way out."""
    return Trainer(cfg, model, Callbacks(callbacks), data).run()


def _every(step: int, crossed_epoch: bool, epochs_done: int, n_steps: int, n_epochs: int) -> bool:
    """Every `n_steps` steps, or every `n_epochs` epochs when this step ended one (0: never)."""
    return bool(n_steps and step % n_steps == 0) or bool(n_epochs and crossed_epoch and epochs_done % n_epochs == 0)


class Trainer:
    def __init__(self, cfg: TrainConfig, model: TrainableModel | None, events: Callbacks, data):
        self.dist = Distributed()
        self.cfg, self.model, self.data = cfg, model, data
        self.events = events if self.dist.is_main else Callbacks()  # one console, one set of files
        self.out = Path(cfg.output_dir).expanduser() / cfg.output_name
        self.ckpt_root = self.out / "checkpoints"
        self.losses: list[float] = []
        self.warnings: list[str] = []
        self.session_id = uuid.uuid4().hex[:10]
        self.started_at = time.time()

    # --- setup --------------------------------------------------------------------------------------
    def _load(self) -> None:
        cfg = self.cfg
        inputs = load_inputs(cfg, self.model, self.data, self.dist, self.events)
        self.model, self.data, self.precision = inputs.model, inputs.data, inputs.precision
        self.device = self.model.device
        self.warnings += list(getattr(self.data, "warnings", []))
        for w in self.warnings:
            self.events.emit("info", message=w)
        bpe = self.data.batches_per_epoch()
        accum = cfg.gradient_accumulation_steps
        if cfg.max_train_steps > 0:
            self.total_steps = cfg.max_train_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * bpe / accum))
        self.total_micro = self.total_steps * accum if cfg.max_train_steps > 0 else cfg.epochs * bpe
        self.bpe = bpe

    def _init_network(self) -> LoRANetwork:
        cfg = self.cfg
        network = build_network(self.model, cfg)
        if cfg.network_weights:
            tensors, _ = read_lora(cfg.network_weights)
            if not cfg.train_text_encoder and any(k.startswith("lora_te") or k.startswith("text_encoder")
                                                  for k in tensors):
                network = build_network(self.model, cfg, include_text_encoder=True)
                self.frozen_te = True
                self.warnings.append("the LoRA file has text-encoder modules; they are kept as they are "
                                     "(set train_text_encoder: true to train them)")
            check_file_type(cfg, tensors, cfg.network_weights)
            renamed, ignored = to_network_keys(network, tensors)
            network.match_file(renamed)  # another rank or LoKr split than the config's: the file's
            loaded, _ = network.load_kohya_state_dict(renamed)
            if not loaded:
                raise UserError(f"none of the {len(tensors)} tensors in '{cfg.network_weights}' match a layer "
                                f"of this {self.model.info.family} model; was it trained on another model family?")
            if ignored:
                self.warnings.append(f"{len(ignored)} tensors of the LoRA file were not used "
                                     f"(e.g. {ignored[0]}); only LoRA up/down weights are trained")
            self.events.emit("info", message=f"continuing from {cfg.network_weights}: {len(loaded)} modules")
        return network.to(device=self.device, dtype=torch.float32)

    # --- run ----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.frozen_te = False
        self._load()
        windows_before = self.model.token_windows
        self.model.set_token_windows(self.cfg.max_token_length // 75)  # a host that cannot says so here
        try:
            return self._run_loaded()
        finally:
            self.model.token_windows = windows_before

    def _run_loaded(self) -> TrainResult:
        cfg, model = self.cfg, self.model
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"{cfg.output_name}.config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if cfg.log_with == "tensorboard" and self.dist.is_main:
            from .tensorboard_log import TensorBoardLogger

            self.events.add(TensorBoardLogger(self.out / "logs"))
        # a compiled step fuses GEGLU itself (and decides what to keep): the lean one is for eager steps
        root = model.trainable_roots()[0]
        denoiser = None if cfg.torch_compile else root
        with model.session(cfg.gradient_checkpointing, cfg.train_text_encoder), lean_geglu(denoiser), \
                fp8_compute(root, cfg.fp8_compute, self.device, self.precision, self._say):
            with torch.random.fork_rng(devices=[]):  # the host's own random state is left alone
                torch.manual_seed(cfg.seed)  # the LoRA's initial weights: the same for a seed, on every process
                network = self._init_network()
            network.attach()
            self.network = network
            self.position = ckpt.Position()
            self.saved_step = 0
            try:
                self.data.prepare_cache(model, progress=self._cache_progress)
                self._setup_optimization(network)
                self._maybe_resume(network)
                self._setup_fast_step()
                self.parking = EncoderParking.start(model, self.data, self.device, cfg.train_text_encoder)
                self.events.emit("start", total_steps=self.total_steps, step=self.position.step,
                                 message=self._summary())
                self._loop()
                return self._finish()
            except BaseException as exc:
                self._abort(exc)
                if isinstance(exc, torch.OutOfMemoryError):
                    raise UserError(f"out of memory on {self.device} at step {self.position.step}. Turn on "
                                    f"gradient_checkpointing, lower batch_size or resolution, or use optimizer "
                                    f"AdamW8bit; the run can resume from its last checkpoint.") from exc
                raise
            finally:
                if getattr(self, "parking", None) is not None:
                    self.parking.unpark()
                network.detach()
                self._release()

    def _say(self, message: str) -> None:
        self.events.emit("info", message=message)

    def _summary(self) -> str:
        info, d = self.model.info, self.data
        return (f"{info.family} ({info.prediction_type}), {len(self.network)} LoRA modules, "
                f"{d.num_train_images} images ({d.num_reg_images} reg), {self.bpe} batches/epoch, "
                f"{self.total_steps} steps, {self._precision_text()}")

    def _precision_text(self) -> str:
        if self.precision == "no":
            return "fp32"
        return self.precision + ("" if self.use_autocast else " (native, no autocast)")

    def _cache_progress(self, i: int, total: int) -> None:
        self.events.emit("info", message=f"caching {i}/{total}")

    def _setup_optimization(self, network: LoRANetwork) -> None:
        cfg = self.cfg
        te_params = [] if self.frozen_te else network.text_encoder_parameters()
        if self.frozen_te:
            for p in network.text_encoder_parameters():
                p.requires_grad_(False)
        self.params = network.unet_parameters() + te_params
        self.optimizer = build_optimizer(cfg, param_groups(cfg, network.unet_parameters(), te_params), self.device)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = grad_scaler(self.device, self.precision)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.dist.rank)
        self.acp = self.model.alphas_cumprod().to(self.device, torch.float32)
        # LoRA weights cast once per step and held to its end, unless checkpointing: then each layer casts
        # as it runs, so only the recomputed block's casts are alive in backward (SDXL: 81 MiB less).
        # A compiled step casts inside its graph (the compiler decides what to keep for backward).
        self.step_cast_dtype = (compute_dtype(self.precision) if self.precision != "no"
                                and not cfg.gradient_checkpointing and not cfg.torch_compile else None)
        self.data.step_encode_precision = "bf16" if self.precision == "bf16" and not cfg.no_half_vae else "no"
        # bf16 weights need no autocast: it would only add casts and float32 copies of activations
        self.use_autocast = not (cfg.autocast == "auto" and self.precision == "bf16" and self.model.computes_in(
            torch.bfloat16, text_encoder=bool(te_params)))
        if cfg.torch_compile:
            self._loss = loss_for_run(self._loss, self.device, lambda text: self.events.emit("info", message=text))

    def _setup_fast_step(self) -> None:
        """The CUDA-graphed step where the config allows it (engine/fast_step.py says when)."""
        self.fast = None
        why = unsupported_reason(self.cfg, self.device, self.precision, self.optimizer,
                                 bool(self.network.text_encoder_parameters()) and not self.frozen_te)
        if why is None and getattr(getattr(self, "dist", None), "enabled", False):
            why = "several GPUs (the gradient all-reduce runs in the plain step)"
        if why is None:
            self.fast = FastStep(self)
        elif self.cfg.cuda_graph and self.device.type == "cuda":
            self.events.emit("info", message=f"training step not CUDA-graphed: {why}")

    def _maybe_resume(self, network: LoRANetwork) -> None:
        folder = ckpt.resolve(self.cfg.resume_from_checkpoint, self.ckpt_root)
        if folder is None:
            if self.cfg.resume_from_checkpoint:
                self.events.emit("info", message=f"no checkpoint in {self.ckpt_root}; starting a new run")
            return
        weights, state = ckpt.load_checkpoint(folder, self.cfg.to_dict())
        network.load_kohya_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"][self.dist.rank], self.generator)
        self.position = ckpt.Position(step=state["step"], micro=state["micro"])
        self.saved_step = self.position.step
        self.events.emit("info", message=f"resumed from {folder} at step {self.position.step}")

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
                loss = self._forward_backward(batch, accum)
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

    def _draw_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise and timesteps, from the run's generator (the same draws on every path)."""
        cfg = self.cfg
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                           generator=self.generator, device=self.device)
        t = torch.randint(0, self.acp.shape[0], (latents.shape[0],), generator=self.generator, device=self.device)
        return noise, t

    def _loss(self, latents, noise, t, cond, time_ids, loss_weights) -> torch.Tensor:
        """The diffusion loss of one batch: shared by the plain and the CUDA-graphed step."""
        model = self.model
        noisy = add_noise(latents, noise, t, self.acp)
        with autocast(self.device, self.precision, self.use_autocast):
            if model.size_conditioning():
                cond = {**cond, "time_ids": time_ids.to(self.device)}
            prediction = model.predict(noisy.to(model.dtype), t, cond)
        return diffusion_loss(prediction, latents, noise, t, self.acp, model.info.prediction_type,
                              sample_weights=loss_weights.to(self.device), min_snr_gamma=self.cfg.min_snr_gamma)

    def _forward_backward(self, batch, accum: int) -> torch.Tensor:
        latents = batch.latents.to(self.device, torch.float32)
        noise, t = self._draw_noise(latents)
        with self.network.cast_weights(self.step_cast_dtype):
            cond = batch.cond
            if cond is None:
                with autocast(self.device, self.precision, self.use_autocast):
                    cond = self.model.encode_text(batch.captions)
            loss = self._loss(latents, noise, t, cond, batch.time_ids, batch.loss_weights)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss

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

    # --- saving -------------------------------------------------------------------------------------
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
        return build_metadata(self.cfg, self.model.info, data_summary=summary, steps=self.position.step,
                              epoch=self.position.micro // self.bpe, total_steps=self.total_steps,
                              batches_per_epoch=self.bpe, started_at=self.started_at,
                              mixed_precision=self.precision, session_id=self.session_id)

    def _write_lora(self, path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
        tensors = self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.save_precision])
        metadata = self._metadata()
        return save_lora(path, tensors, metadata), tensors, metadata

    def _save_checkpoint(self) -> Path | None:
        step = self.position.step
        rng = self.dist.gather(ckpt.rng_state(self.generator))  # collective: every process takes part
        self.saved_step = step
        if not self.dist.is_main:
            return None
        lora_path, _, _ = self._write_lora(self.out / f"{self.cfg.output_name}-step{step:08d}.safetensors")
        folder = ckpt.save_checkpoint(
            self.ckpt_root / f"step-{step:08d}", weights=self.network.kohya_state_dict(None),
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, position=self.position,
            rng=rng, cfg_dict=self.cfg.to_dict(), lora_file=lora_path.name)
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
        except torch.OutOfMemoryError:
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
        if not self.dist.is_main:
            tensors = self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.save_precision])
            return TrainResult(lora_path=None, tensors=tensors, metadata={}, steps=self.position.step,
                               losses=self.losses, output_dir=self.out, warnings=self.warnings)
        path, tensors, metadata = self._write_lora(self.out / f"{self.cfg.output_name}.safetensors")
        from .plot import loss_plot

        loss_plot(self.losses, title=f"{self.cfg.output_name}: loss per step").save(self.out / "loss.png")
        # the LoRA is on disk: free the optimizer and graphs before the encoders come back to the GPU
        # (final preview, unparking), or that moment would be the run's memory peak
        self._release()
        if self.cfg.sample_prompts and not self._preview_due(self.position.step, True, 0):
            self._preview(self.position.step)
        self.events.emit("done", step=self.position.step, total_steps=self.total_steps, path=str(path))
        return TrainResult(lora_path=path, tensors=tensors, metadata=metadata, steps=self.position.step,
                           losses=self.losses, output_dir=self.out, warnings=self.warnings)

    def _abort(self, exc: BaseException) -> None:
        """Keep what the run made: a checkpoint at the last finished step, unless the weights are bad."""
        if isinstance(exc, NonFiniteLoss) or not hasattr(self, "optimizer"):
            self.events.emit("error", step=self.position.step, message=str(exc))
            return
        folder = None
        if self.position.step > self.saved_step and not self.dist.enabled:  # a save is collective with several GPUs
            try:
                folder = self._save_checkpoint()
            except Exception as save_exc:  # never hide the original error behind a failed save
                logger.error("could not save a checkpoint after the run stopped: %s", save_exc)
        elif self.position.step:
            found = ckpt.checkpoint_dirs(self.ckpt_root)
            folder = found[-1] if found else None
        if isinstance(exc, (TrainingStopped, KeyboardInterrupt)) or type(exc).__name__ == "InterruptProcessingException":
            if isinstance(exc, TrainingStopped):
                exc.checkpoint = str(folder) if folder else None
            self.events.emit("stopped", step=self.position.step, path=str(folder) if folder else None,
                             message=f"stopped at step {self.position.step}; resume with "
                                     f"resume_from_checkpoint: latest" if folder else "stopped before the first step")
        else:
            self.events.emit("error", step=self.position.step, message=str(exc),
                             path=str(folder) if folder else None)

    def _release(self) -> None:
        if getattr(self, "fast", None) is not None:
            self.fast.close()
        for name in ("fast", "optimizer", "scheduler", "scaler", "params", "acp", "_loss"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
