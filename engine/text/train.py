"""The text training loop: a PEFT LoRA on a local causal LM, with the image loop's machinery.

`train_text(cfg)` reads and packs the data first (a bad file fails before minutes of model loading),
loads the model, attaches the LoRA and trains with the engine's optimizers and schedules
(engine/optim.py), its checkpoints (engine/checkpoint.py: LoRA weights, optimizer, scheduler, every
RNG and the data position, so a resume continues tensor for tensor), its events (engine/events.py:
the console, TensorBoard and any host subscribe), and loss.png (engine/plot.py). Whatever ends the
run early (Ctrl-C, a subscriber's stop, an error) keeps a checkpoint at the last finished step;
a NaN loss keeps the last good one. At the end: the adapter folder, held-out perplexity before and
after (eval.json), sample generations (samples.md), and with `merge` the merged model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import dump_config
from ..errors import NonFiniteLoss, TrainingStopped, UserError
from ..events import Callbacks
from ..fast_step import host_lrs, unsupported_reason
from ..optim import build_optimizer, build_scheduler, optimizer_step
from ..runtime import compute_dtype, grad_scaler, resolve_device, resolve_precision
from .dataset import build_data
from .evaluate import generate_samples, load_sample_prompts, perplexity, samples_markdown
from .model import attach_lora, check_model_folder, load_model, load_tokenizer
from .packing import IGNORE
from .save import adapter_metadata, merge_adapter, save_adapter
from .step import TextForward, TextGraphStep, device_inputs
from .tokenize import Encoder

logger = logging.getLogger(__name__)
TEXT_STATE = "text_state.json"  # beside engine/checkpoint's state.pt: what a text resume must also match


@dataclass
class TextResult:
    adapter_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)  # {"before": {...}, "after": {...}}
    samples: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    merged_dir: Path | None = None
    forward_path: str = ""  # "lean" or "transformers"


def train_text(cfg, *, callbacks=(), model=None, data=None, tokenizer=None) -> TextResult:
    """Train a text LoRA as `cfg` (a TextConfig) says; see the module docstring for every way out.

    `model` (a transformers causal LM already on its device, frozen) and `data` (a TextData) replace
    loading `base_model` and reading `train_data`: how bench/text_llm.py trains a model built in code."""
    return TextTrainer(cfg, Callbacks(callbacks), model=model, data=data, tokenizer=tokenizer).run()


class TextTrainer:
    def __init__(self, cfg, events: Callbacks, *, model=None, data=None, tokenizer=None):
        self.cfg, self.events = cfg, events
        self.model, self.data, self.tokenizer = model, data, tokenizer
        self.out = Path(cfg.output_dir).expanduser() / cfg.output_name
        self.ckpt_root = self.out / "checkpoints"
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.warnings: list[str] = []
        self.evaluation: dict = {}
        self.position = ckpt.Position()
        self.saved_step = 0
        self.fast = None
        self.generator = torch.Generator()  # checkpoints store one; text runs draw from the global RNGs

    # --- setup --------------------------------------------------------------------------------------
    def _load(self) -> None:
        cfg = self.cfg
        if self.model is None or self.data is None:
            cfg.check_paths()
            check_model_folder(cfg.base_model, cfg.trust_remote_code)
            self.tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.mixed_precision, self.device)
        if self.data is None:
            self.data = build_data(cfg, self.tokenizer)
        self.warnings += self.data.warnings
        for w in self.warnings:
            self.events.emit("info", message=w)
        self.encoder = None if self.tokenizer is None else Encoder(
            self.tokenizer, self.tokenizer.chat_template if self.data.chat else None)
        self.bpe = self.data.train.batches_per_epoch()
        accum = cfg.gradient_accumulation_steps
        self.total_steps = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * self.bpe / accum))
        self.total_micro = self.total_steps * accum if cfg.max_train_steps else cfg.epochs * self.bpe
        model = self.model if self.model is not None else load_model(cfg, self.device, compute_dtype(self.precision))
        self.model = None  # the PEFT model holds it from here
        self.peft_model = attach_lora(model, cfg, cfg.seed)
        self.peft_model.train()
        self.forward = TextForward(self.peft_model, cfg, say=lambda text: self.events.emit("info", message=text))
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def _setup(self) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_yaml = dump_config(cfg)
        (self.out / f"{cfg.output_name}.config.yaml").write_text(self.config_yaml, encoding="utf-8")
        self.tb = None
        if cfg.log_with == "tensorboard":
            from ..tensorboard_log import TensorBoardLogger

            self.tb = TensorBoardLogger(self.out / "logs")
            self.events.add(self.tb)
        group = {"params": self.params, "lr": cfg.learning_rate, "name": "lora"}
        self.optimizer = build_optimizer(cfg, [group], self.device)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = grad_scaler(self.device, self.precision)

    def _setup_fast_step(self) -> None:
        """The CUDA-graphed step where the config allows it (engine/fast_step.py and step.py say when)."""
        why = unsupported_reason(self.cfg, self.device, self.precision, self.optimizer, False)
        if why is None and self.forward.lean is None:
            why = f"transformers' forward ({self.forward.lean_reason}) synchronises with the host"
        if why is None:
            self.fast = TextGraphStep(self)
        elif self.cfg.cuda_graph and self.device.type == "cuda":
            self.events.emit("info", message=f"training step not CUDA-graphed: {why}")

    def _maybe_resume(self) -> None:
        folder = ckpt.resolve(self.cfg.resume_from_checkpoint, self.ckpt_root)
        if folder is None:
            if self.cfg.resume_from_checkpoint:
                self.events.emit("info", message=f"no checkpoint in {self.ckpt_root}; starting a new run")
            return
        weights, state = ckpt.load_checkpoint(folder, self.cfg.to_dict())
        text_state = json.loads((folder / TEXT_STATE).read_text()) if (folder / TEXT_STATE).is_file() else {}
        now = self._text_state()
        changed = [f"{k}: {text_state[k]!r} -> {now[k]!r}" for k in ("max_length", "packing", "data")
                   if k in text_state and text_state[k] != now[k]]
        if changed:
            raise UserError(f"cannot resume from {folder}: the data or its packing differ from the checkpoint's run "
                            f"({'; '.join(changed)}). Put them back, or start a new run without "
                            f"resume_from_checkpoint (network_weights can start from its adapter folder).")
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"][0], self.generator)
        self.position = ckpt.Position(step=state["step"], micro=state["micro"])
        self.saved_step = self.position.step
        self.evaluation = dict(text_state.get("evaluation", {}))
        self.losses = list(text_state.get("losses", []))
        self.events.emit("info", message=f"resumed from {folder} at step {self.position.step}")

    def _text_state(self) -> dict:
        return {"max_length": self.cfg.max_length, "packing": self.cfg.packing, "data": self.data.digest(),
                "evaluation": self.evaluation, "losses": self.losses}

    def _summary(self) -> str:
        train = self.data.train
        return (f"{getattr(self.peft_model.config, 'model_type', 'model')} ({self.forward.path} forward), "
                f"{sum(p.numel() for p in self.params):,} LoRA weights, {len(train.samples)} samples in "
                f"{len(train.rows)} rows of {train.length} tokens ({train.fill:.0%} filled), {self.bpe} "
                f"batches/epoch, {self.total_steps} steps, {self.precision if self.precision != 'no' else 'fp32'}")

    # --- run ----------------------------------------------------------------------------------------
    def run(self) -> TextResult:
        self._load()
        try:
            self._setup()
            self._maybe_resume()
            self._setup_fast_step()
            if "before" not in self.evaluation:
                self._evaluate("before")
            if self.position.step == 0:
                torch.manual_seed(self.cfg.seed)  # dropout draws from the default generators (a resume restores them)
            self.events.emit("start", total_steps=self.total_steps, step=self.position.step,
                             message=self._summary())
            self._loop()
            return self._finish()
        except BaseException as exc:
            self._abort(exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise UserError(f"out of memory on {self.device} at step {self.position.step}. Turn on "
                                f"gradient_checkpointing, lower max_length or batch_size, or set load_in_4bit; "
                                f"the run can resume from its last checkpoint.") from exc
            raise
        finally:
            self._release()

    def _loop(self) -> None:
        cfg, pos, data = self.cfg, self.position, self.data.train
        plan_epoch, plan = -1, []
        pending: list[tuple[int, torch.Tensor]] = []
        last_flush = time.monotonic()
        while pos.step < self.total_steps:
            n = max(1, min(cfg.gradient_accumulation_steps, self.total_micro - pos.micro))
            batches = []
            for k in range(n):
                epoch, index = divmod(pos.micro + k, self.bpe)
                if epoch != plan_epoch:
                    plan, plan_epoch = data.epoch_plan(epoch), epoch
                batches.append(data.batch(plan[index]))
            denominator = max(1, sum(int((b["targets"] != IGNORE).sum()) for b in batches))
            if self.fast is not None and n == 1:
                loss = self.fast.step(batches[0], denominator).clone()  # a replay overwrites the graph's own
                self.fast.scheduler_step()
            else:
                loss = self._forward_backward(batches, denominator)
                self._update()
            pos.micro += n
            pos.step += 1
            pending.append((pos.step, loss))
            now = time.monotonic()
            reported = []
            if self.device.type == "cpu" or now - last_flush >= 0.5 or pos.step == self.total_steps:
                reported, pending, last_flush = self._flush(pending), [], now
            lr = self.fast.lr() if self.fast is not None else host_lrs(self.scheduler, self.optimizer)[0]
            self.lrs.append(lr)
            self.events.emit("step", step=pos.step, total_steps=self.total_steps, epoch=pos.micro // self.bpe, lr=lr,
                             loss=reported[-1][1] if reported else None, losses=reported)
            if self.events.should_stop():
                raise TrainingStopped("stopped by the user")
            epochs_done = pos.micro // self.bpe
            crossed = epochs_done > (pos.micro - n) // self.bpe
            due = (cfg.save_steps and pos.step % cfg.save_steps == 0) or (
                cfg.save_every_n_epochs and crossed and epochs_done % cfg.save_every_n_epochs == 0)
            if pos.step < self.total_steps and due:
                self._save_checkpoint()

    def _forward_backward(self, batches: list[dict], denominator: int) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for batch in batches:
            loss = self.forward.loss(device_inputs(batch, self.device, denominator))
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = total + loss.detach()
        return total

    def _update(self) -> None:
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.params, self.cfg.max_grad_norm)

    def _flush(self, pending: list[tuple[int, torch.Tensor]]) -> list[tuple[int, float]]:
        values = torch.stack([v for _, v in pending]).float().cpu().tolist()
        reported = [(s, v) for (s, _), v in zip(pending, values)]
        for step, value in reported:
            if not math.isfinite(value):
                last = ckpt.checkpoint_dirs(self.ckpt_root)
                where = f"The last good checkpoint is {last[-1]}." if last else "No checkpoint was written yet."
                raise NonFiniteLoss(f"the loss became {value} at step {step}. {where} Common causes: fp16 overflow "
                                    f"(try mixed_precision: bf16, or no) or a learning rate that is too high "
                                    f"(now {self.cfg.learning_rate}).")
        self.losses.extend(v for _, v in reported)
        return reported

    # --- evaluation and saving ------------------------------------------------------------------------
    def _evaluate(self, label: str) -> None:
        if self.data.heldout is None:
            return
        result = perplexity(self.forward, self.data.heldout, self.device)
        self.evaluation[label] = result
        self.events.emit("info", message=f"held-out perplexity {label} training: {result['perplexity']:.3f} "
                                         f"(loss {result['loss']:.4f} over {result['tokens']} tokens)")
        if self.tb is not None:
            self.tb.writer.add_scalar("eval/perplexity", result["perplexity"], self.position.step)

    def _adapter(self, folder: Path) -> Path:
        extra = {"evaluation": self.evaluation, "forward": self.forward.path, "epoch": self.position.micro // self.bpe,
                 "train_samples": len(self.data.train.samples), "max_length": self.cfg.max_length}
        metadata = adapter_metadata(self.cfg, self.config_yaml, steps=self.position.step, extra=extra)
        return save_adapter(self.peft_model, folder, precision=self.cfg.save_precision, metadata=metadata,
                            tokenizer=self.tokenizer if self.data.template_changed else None)

    def _save_checkpoint(self) -> Path:
        step = self.position.step
        adapter = self._adapter(self.out / f"{self.cfg.output_name}-step{step:08d}")
        folder = ckpt.save_checkpoint(
            self.ckpt_root / f"step-{step:08d}", weights=dict(zip(self.names, self.params)),
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, position=self.position,
            rng=[ckpt.rng_state(self.generator)], cfg_dict=self.cfg.to_dict(), lora_file=adapter.name)
        (folder / TEXT_STATE).write_text(json.dumps(self._text_state()), encoding="utf-8")
        self.saved_step = step
        ckpt.prune(self.ckpt_root, self.cfg.save_last_n_checkpoints)
        self.events.emit("checkpoint", step=step, path=str(folder), lora_path=str(adapter))
        return folder

    def _finish(self) -> TextResult:
        from ..plot import loss_plot

        cfg = self.cfg
        self._release()  # the optimizer and graphs go before evaluation and generation need memory
        self._adapter(self.out)
        self._evaluate("after")
        self._adapter(self.out)  # again, with the "after" perplexity in its metadata
        (self.out / "eval.json").write_text(json.dumps(self.evaluation, indent=2), encoding="utf-8")
        loss_plot(self.losses, self.lrs[-len(self.losses):] if self.losses else None,
                  title=f"{cfg.output_name}: loss per step").save(self.out / "loss.png")
        samples = [] if self.encoder is None else generate_samples(
            self.peft_model, self.tokenizer, self.encoder, load_sample_prompts(cfg.sample_prompts), cfg, self.device,
            self.data.chat)
        if samples:
            (self.out / "samples.md").write_text(samples_markdown(samples, self.position.step), encoding="utf-8")
        merged = None
        if cfg.merge:
            forward_path = self.forward.path
            del self.forward, self.peft_model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.events.emit("info", message=f"merging the adapter into {cfg.base_model}")
            merged = merge_adapter(self.out, self.out / "merged", base=cfg.base_model, device=str(self.device),
                                   trust_remote_code=cfg.trust_remote_code)
        else:
            forward_path = self.forward.path
        self.events.emit("done", step=self.position.step, total_steps=self.total_steps, path=str(self.out))
        return TextResult(self.out, self.position.step, self.losses, self.evaluation, samples, self.out,
                          self.warnings, merged, forward_path)

    def _abort(self, exc: BaseException) -> None:
        """Keep what the run made: a checkpoint at the last finished step, unless the weights are bad."""
        if isinstance(exc, NonFiniteLoss) or not hasattr(self, "optimizer"):
            self.events.emit("error", step=self.position.step, message=str(exc))
            return
        folder = None
        if self.position.step > self.saved_step:
            try:
                folder = self._save_checkpoint()
            except Exception as save_exc:  # never hide the original error behind a failed save
                logger.error("could not save a checkpoint after the run stopped: %s", save_exc)
        elif self.position.step:
            found = ckpt.checkpoint_dirs(self.ckpt_root)
            folder = found[-1] if found else None
        if isinstance(exc, (TrainingStopped, KeyboardInterrupt)):
            if isinstance(exc, TrainingStopped):
                exc.checkpoint = str(folder) if folder else None
            self.events.emit("stopped", step=self.position.step, path=str(folder) if folder else None,
                             message=f"stopped at step {self.position.step}; resume with resume_from_checkpoint: "
                                     f"latest" if folder else "stopped before the first step")
        else:
            self.events.emit("error", step=self.position.step, message=str(exc), path=str(folder) if folder else None)

    def _release(self) -> None:
        if getattr(self, "forward", None) is not None:
            self.forward.close()
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        for name in ("optimizer", "scheduler", "scaler"):
            self.__dict__.pop(name, None)
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
