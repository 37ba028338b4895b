"""A training run, the same for every host.

`train(cfg, model)` attaches LoRA hooks to the model (a host's loaded model or one loaded from
`cfg.base_model`), trains, writes the kohya file and returns it. Whatever ends the run (done, Cancel,
Ctrl-C, an exception, a NaN) the hooks come off and the host's model is left as it was; a stop keeps a
checkpoint to resume from. `Trainer` is split by job: setting the run up (here), the step loop
(train_loop.py) and what the run writes (run_output.py); one training step is engine/step.py.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, dump_config
from .distributed import Distributed
from .encoder_parking import EncoderParking
from .errors import UserError
from .events import Callbacks
from .fast_step import FastStep, graph_refusal
from .lora.blocks import unet_param_groups as block_param_groups
from .lora.change_check import ChangeCheck
from .lora.ema import LoRAEma, resume_ema
from .lora.kohya_io import read_lora, to_network_keys
from .lora.network import LoRANetwork
from .lora.targets import build_network
from .memory.recovery import OutOfMemoryRecovery
from .memory.run import memory_note
from .lora.variants import check_file_type
from .model import TrainableModel
from .nan_guard import NanGuard
from .models.fp8_compute import fp8_compute
from .models.flux_compile import compiled_blocks
from .models.flux_lean import lean_flux
from .models.flux_offload import offload_checkpointing, offloading
from .models.geglu import lean_geglu
from .optim import build_optimizer, build_scheduler, param_groups
from .options import EngineOptions
from .run_inputs import load_inputs
from .run_output import RunOutput, TrainResult
from .runtime import compute_dtype, grad_scaler, noise_seed
from .step import TrainingStep
from .train_loop import TrainingLoop
from .watchdog import StallWatchdog
from .validation import ValidationRun

logger = logging.getLogger(__name__)
__all__ = ["TrainResult", "Trainer", "train"]


def train(cfg: TrainConfig, model: TrainableModel | None = None, *, callbacks=(), data=None,
          options: EngineOptions | None = None, stop_exceptions: tuple[type[BaseException], ...] = ()
          ) -> TrainResult:
    """Train a LoRA as `cfg` says; see the module docstring for what happens on every way out.

    `stop_exceptions`: the host's own exception types that mean "the user stopped the run" (ComfyUI's
    Cancel raises InterruptProcessingException from a callback): such a run ends "stopped" with a
    checkpoint, like Ctrl-C, not "error". `options`: engine options for benchmarks and tests."""
    return Trainer(cfg, model, Callbacks(callbacks), data, options or EngineOptions(), tuple(stop_exceptions)).run()


class Trainer(TrainingLoop, RunOutput, ValidationRun):
    def __init__(self, cfg: TrainConfig, model: TrainableModel | None, events: Callbacks, data,
                 options: EngineOptions | None = None, stop_exceptions: tuple[type[BaseException], ...] = ()):
        self.dist = Distributed(cfg.ddp_timeout)
        self.cfg, self.model, self.data = cfg, model, data
        self.options = options or EngineOptions()
        self.stop_exceptions = stop_exceptions
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
        # a host that cannot join windows says so here
        self.model.set_token_windows(self.cfg.max_token_length // self.model.info.spec.token_window)
        self.model.set_text_options(self.cfg)
        try:
            with self.dist.stop_on_sigterm():
                return self._run_loaded()
        finally:
            self.model.token_windows = windows_before

    def _run_loaded(self) -> TrainResult:
        cfg, model = self.cfg, self.model
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"{cfg.output_name}.config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if cfg.log_with == "tensorboard" and self.dist.is_main:
            from .tensorboard_log import TensorBoardLogger, tensorboard_dir

            self.events.add(TensorBoardLogger(tensorboard_dir(cfg, self.out)))
        # a compiled step fuses GEGLU itself (and decides what to keep): the lean one is for eager steps
        root = model.trainable_roots()[0]
        lean = self.options.lean_geglu and model.info.spec.lean_geglu and not cfg.torch_compile
        # a family whose forward compiles block by block (Flux.1) compiles that instead of the whole loss
        blocks = cfg.torch_compile and model.info.spec.compile_blocks
        with model.session(cfg.gradient_checkpointing, cfg.train_text_encoder), lean_geglu(root if lean else None), \
                lean_flux(self.options.lean_flux), offload_checkpointing(cfg.cpu_offload_checkpointing), \
                fp8_compute(root, cfg.fp8_compute, self.device, self.precision, self._say), \
                compiled_blocks(blocks, self.device, self._say, backend=self.options.compile_backend,
                                devices=self.options.compile_devices):
            with torch.random.fork_rng(devices=[]):  # the host's own random state is left alone
                torch.manual_seed(cfg.seed)  # the LoRA's initial weights: the same for a seed, on every process
                network = self._init_network()
            network.up_in_place, network.cast_together = self.options.up_in_place, self.options.cast_together
            network.attach()
            self.network = network
            self.position = ckpt.Position()
            self.saved_step = 0
            try:
                self.data.prepare_cache(model, progress=self._cache_progress)
                self._setup_validation()  # validation_data_dir / validation_split: its images encoded once
                self._setup_optimization(network)
                self._maybe_resume(network)
                self.change_check = ChangeCheck(network, self.position.step)  # warns at the end if nothing learned
                self._setup_fast_step(cfg.gradient_checkpointing)
                self.recovery = OutOfMemoryRecovery(self)
                self.nan_guard = NanGuard(self)
                factor, seconds = self.options.stall_after
                self.watchdog = StallWatchdog(self._say, clock=self.options.clock, factor=factor, min_seconds=seconds,
                                              compiling=cfg.torch_compile)
                self.parking = EncoderParking.start(model, self.data, self.device, cfg.train_text_encoder)
                guards = getattr(self, "resumed_guards", {})  # a resumed run goes on with what they changed
                self.recovery.resume(guards.get("recovery"))
                self.nan_guard.resume(guards.get("nan_guard"))
                self.events.emit("start", total_steps=self.total_steps, step=self.position.step,
                                 message=self._summary())
                self._loop()
                return self._finish()
            except BaseException as exc:
                self._abort(exc)
                if isinstance(exc, torch.cuda.OutOfMemoryError):
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
        return (f"{info.family} ({self.step.objective.describe()}), {len(self.network)} LoRA modules, "
                f"{d.num_train_images} images ({d.num_reg_images} reg), {self.bpe} batches/epoch, "
                f"{self.total_steps} steps, {self._precision_text()}" + memory_note(self))

    def _precision_text(self) -> str:
        if self.precision == "no":
            return "fp32"
        return self.precision + ("" if self.use_autocast else " (native, no autocast)")

    def _cache_progress(self, i: int, total: int) -> None:
        self.events.emit("caching", step=i, total_steps=total, message=f"caching {i}/{total}")

    def _setup_optimization(self, network: LoRANetwork) -> None:
        cfg = self.cfg
        te_params = [] if self.frozen_te else network.text_encoder_parameters()
        if self.frozen_te:
            for p in network.text_encoder_parameters():
                p.requires_grad_(False)
        self.params = network.unet_parameters() + te_params
        unet_groups = block_param_groups(cfg, network, self.model.info.spec)  # None without block-wise lr
        self.optimizer = build_optimizer(cfg, param_groups(cfg, network.unet_parameters(), te_params, unet_groups),
                                         self.device)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = grad_scaler(self.device, self.precision)
        self.ema = LoRAEma(network, cfg.ema_decay, cfg.ema_start_step) if cfg.ema_decay > 0 else None
        # the same on every process: each draws the global batch's noise and keeps its slice. Its own stream,
        # not the one the LoRA's initial weights came from: seeded alike, the first steps' noise would repeat
        # the init's numbers (kohya draws both from one stream in turn, so nothing repeats there)
        self.generator = torch.Generator(device=self.device).manual_seed(noise_seed(cfg.seed))
        # LoRA weights cast once per step and held to its end, unless checkpointing: then each layer casts
        # as it runs, so only the recomputed block's casts are alive in backward (SDXL: 81 MiB less).
        # A compiled step casts inside its graph (the compiler decides what to keep for backward).
        self.step_cast_dtype = (compute_dtype(self.precision) if self.precision != "no"
                                and not cfg.gradient_checkpointing and not cfg.torch_compile else None)
        self.data.step_encode_precision = "bf16" if self.precision == "bf16" and not cfg.no_half_vae else "no"
        # bf16 weights need no autocast: it would only add casts and float32 copies of activations
        self.use_autocast = not (cfg.autocast == "auto" and self.precision == "bf16" and self.model.computes_in(
            torch.bfloat16, text_encoder=bool(te_params)))
        # the training step, with the objective the host's model trains with and the run's options
        objective = self.model.objective().for_training(cfg, self.device)
        self.step = TrainingStep(model=self.model, network=network, objective=objective, generator=self.generator,
                                 precision=self.precision, use_autocast=self.use_autocast,
                                 cast_dtype=self.step_cast_dtype)
        if cfg.torch_compile and not self.model.info.spec.compile_blocks:
            self.step.compile(self.options.compile_backend, self.options.compile_devices,
                              lambda text: self.events.emit("info", message=text))

    def _setup_fast_step(self, checkpointing: bool) -> None:
        """The CUDA-graphed step where the run allows it (`fast_step.graph_refusal` says when);
        `checkpointing`: gradient checkpointing is on now (the config's, or the recovery's)."""
        cfg, options = self.cfg, self.options
        self.fast = None
        why = graph_refusal(self, checkpointing, offloading=offloading(), capture=not options.fast_step_without_graph)
        if why is None:
            self.fast = FastStep(self.step, optimizer=self.optimizer, scheduler=self.scheduler, params=self.params,
                                 max_grad_norm=cfg.max_grad_norm, capture=not options.fast_step_without_graph,
                                 say=lambda text: self.events.emit("info", message=text))
        elif cfg.cuda_graph and self.device.type == "cuda":
            self.events.emit("info", message=f"training step not CUDA-graphed: {why}")

    def _maybe_resume(self, network: LoRANetwork) -> None:
        folder = ckpt.resolve(self.cfg.resume_from_checkpoint, self.ckpt_root)
        if folder is None:
            if self.cfg.resume_from_checkpoint:
                self.events.emit("info", message=f"no checkpoint in {self.ckpt_root}; starting a new run")
            return
        weights, state = ckpt.load_checkpoint(folder, self.dist.run_settings(self.cfg.to_dict()))
        network.load_kohya_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"][0], self.generator)  # the processes share one generator state
        self.position = ckpt.Position(step=state["step"], micro=state["micro"])
        self.resumed_guards = state.get("guards") or {}  # applied once the guards exist (_run_loaded)
        self.saved_step = self.position.step
        self.events.emit("info", message=f"resumed from {folder} at step {self.position.step}")
        if self.ema is not None:
            self.events.emit("info", message=resume_ema(self.ema, folder))

    def _release(self) -> None:
        if getattr(self, "recovery", None) is not None:
            self.recovery.close()  # checkpointing the recovery turned on
        if getattr(self, "fast", None) is not None:
            self.fast.close()
        if getattr(self, "step", None) is not None:
            self.step.close()
        for name in ("fast", "step", "optimizer", "scheduler", "scaler", "params"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
