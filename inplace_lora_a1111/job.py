"""One training job at a time, in a background thread that holds the WebUI's queue lock.

The tab's Train button and `POST /inplace-lora/v1/train` both call `MANAGER.start(request)`: the
request (a preset name plus `TrainConfig` fields, plus `preview_*` settings) is checked at once so a
bad folder or value is answered immediately, then the thread takes `queue_lock` (no txt2img can run on
the model mid-step), un-merges the built-in Lora extension's weights, trains through the engine,
copies the finished file into the Lora folder under a name no cached network has, renders
`<lora:name:S>` previews, and refreshes the Lora list. Progress goes to `shared.state` (the WebUI's
progress bar and `/sdapi/v1/progress`) and to `status()`; Stop is `shared.state.interrupt()`.
A request with `"resume": true` continues the last stopped run of its name (resume.py).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from engine.checkpoint import ResumeMismatch
from engine.config import TrainConfig
from engine.errors import ConfigError, DatasetError, ModelError, TrainingStopped, UserError
from engine.events import TrainEvent
from engine.lora.kohya_io import atomic_write_bytes

from . import host
from .presets import apply_preset
from .previews import PreviewSettings, strength_previews
from .resume import API, Controls, mismatch_message, run_to_resume, stopped_message

logger = logging.getLogger(__name__)
RUNNING = ("starting", "caching", "training", "saving", "previews")
PRECISION_OF = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "no"}


class JobBusy(UserError):
    """A job is already running."""


@dataclass
class JobPlan:
    cfg: TrainConfig
    name: str
    lora_dir: Path
    previews: PreviewSettings


def default_prompt(cfg: TrainConfig) -> str:
    """The first caption of the dataset (what the LoRA was taught), with the trigger word."""
    from engine.data.records import scan_dataset
    from engine.data.text import fixed_caption

    try:
        scan = scan_dataset(cfg.train_data_dir, caption_extension=cfg.caption_extension,
                            metadata_path=cfg.metadata_path, min_image_size=cfg.min_image_size)
        caption = next((r.caption for s in scan.subsets for r in s.records if r.caption), "")
    except UserError:
        caption = ""
    return fixed_caption(caption, trigger_word=cfg.trigger_word).strip() or cfg.trigger_word or "a photo"


def make_plan(request: dict, *, lora_dir: Path, work_dir: Path, presets: dict | None = None,
              controls: Controls = API) -> JobPlan:
    """Validate a request into a config, a unique LoRA name and preview settings (raises UserError)."""
    if not isinstance(request, dict):
        raise ConfigError("the request must be a JSON object of training settings.")
    fields = {k: v for k, v in request.items() if k not in ("preset", "resume") and not k.startswith("preview_")}
    preview = {k[len("preview_"):]: v for k, v in request.items() if k.startswith("preview_")}
    fields = apply_preset(str(request.get("preset") or ""), fields, presets)
    if fields.get("base_model"):
        raise ConfigError("base_model cannot be set here: the trainer uses the checkpoint the WebUI has loaded "
                          "(pick it in the checkpoint dropdown).")
    folder = str(fields.get("train_data_dir") or "").strip()
    if not folder:
        raise DatasetError("choose the dataset folder (train_data_dir): a folder of images with .txt captions.")
    if not Path(folder).expanduser().is_dir():
        raise DatasetError(f"the dataset folder '{folder}' does not exist or is not a folder.")
    fields.setdefault("output_dir", str(work_dir))
    stem = str(fields.get("output_name") or "").strip() or Path(folder).expanduser().resolve().name or "my_lora"
    if request.get("resume"):
        name = run_to_resume(stem, Path(fields["output_dir"]).expanduser(), controls)
        fields["resume_from_checkpoint"] = "latest"
    elif fields.get("resume_from_checkpoint"):
        name = stem  # continue in the same work folder; the file gets a fresh name in the Lora folder
    else:
        name = host.unique_name(stem, [lora_dir, Path(fields["output_dir"]).expanduser()])
    fields["output_name"] = name
    cfg = TrainConfig.from_dict(fields, source="request")
    settings = PreviewSettings.from_request({"seed": cfg.sample_seed, "steps": cfg.sample_steps,
                                             "cfg": cfg.sample_cfg, **preview})
    if not settings.prompt:
        settings.prompt = default_prompt(cfg)
    if (cfg.sample_every_n_steps or cfg.sample_every_n_epochs) and not cfg.sample_prompts:
        cfg = cfg.replace(sample_prompts=[settings.prompt])
    return JobPlan(cfg=cfg, name=name, lora_dir=lora_dir, previews=settings)


class TrainJob:
    """One run: its plan, its progress, and what it produced. Safe to read from other threads."""

    def __init__(self, plan: JobPlan, controls: Controls = API):
        self.id = uuid.uuid4().hex[:10]
        self.plan = plan
        self.controls = controls  # the buttons or request keys the messages name
        self.status = "starting"
        self.step = self.total = 0
        self.losses: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []  # (step, validation loss): the chart's second series
        self.messages: list[str] = []
        self.preview_images: list[tuple[object, str]] = []  # (PIL image, caption), newest last
        self.lora_file: Path | None = None
        self.card_preview: Path | None = None
        self.strength_grid: Path | None = None
        self.last_checkpoint_lora: str | None = None
        self.stopped_checkpoint: str | None = None
        self.preview_size: tuple[int, int] | None = None
        self.output_dir: Path | None = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.stop_requested = False
        self.has_lock = False  # while waiting for the queue lock, Stop must not interrupt someone's txt2img
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    def note(self, message: str) -> None:
        with self._lock:
            self.messages.append(message)
            del self.messages[:-50]
        logger.info("LoRA Trainer: %s", message)

    # --- engine callbacks ----------------------------------------------------------------------------
    def on_event(self, event: TrainEvent) -> None:
        state = host.state()
        if event.kind == "start":
            self.status, self.total, self.step = "training", event.total_steps, event.step
            state.job_count = event.total_steps
            self.note(event.message)
        elif event.kind == "step":
            self.step = event.step
            with self._lock:
                self.losses.extend(event.losses)
            state.job_no = event.step
            loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
            state.textinfo = f"LoRA Trainer: step {event.step}/{event.total_steps}{loss}"
        elif event.kind == "validation":
            with self._lock:
                self.validation = list(event.losses)
        elif event.kind == "preview":
            with self._lock:
                self.preview_images += [(im, f"step {event.step}: {p}") for im, p in zip(event.images, event.prompts)]
                del self.preview_images[:-12]
            if event.images:
                state.assign_current_image(event.images[-1])
            state.job_count, state.job_no = self.total, self.step  # txt2img advanced them
        elif event.kind == "checkpoint":
            self.last_checkpoint_lora = event.lora_path
            self.note(f"checkpoint at step {event.step}")
        elif event.kind == "caching":
            self.status = "caching"
            state.textinfo = f"LoRA Trainer: {event.message}"
        elif event.kind == "stopped":  # the message is the tab's own (_keep_stopped_file), from these fields
            self.step, self.stopped_checkpoint = event.step, event.path
        elif event.kind == "info":
            self.note(event.message)
        elif event.kind == "error" and event.message:
            self.note(event.message)

    def should_stop(self) -> bool:
        return self.stop_requested or bool(getattr(host.state(), "interrupted", False))

    # --- the run ---------------------------------------------------------------------------------------
    def run(self) -> None:
        state = host.state()
        try:
            with host.queue_lock():
                self.has_lock = True
                state.begin(job="LoRA Trainer")
                try:
                    if self.stop_requested:
                        raise TrainingStopped("stopped before training started")
                    self._train()
                except TrainingStopped:
                    self._keep_stopped_file()
                finally:
                    host.clear_condition_cache()
                    state.end()
                    state.interrupted = False
        except ResumeMismatch as exc:
            self.error, self.status = mismatch_message(exc, self.controls), "error"
        except UserError as exc:
            self.error, self.status = str(exc), "error"
        except Exception as exc:  # a bug: keep the traceback in the console, say so in the tab
            logger.error("LoRA Trainer failed:\n%s", traceback.format_exc())
            self.error, self.status = f"{type(exc).__name__}: {exc} (details in the WebUI console)", "error"
        finally:
            self.has_lock = False
            self.finished = time.time()
            if self.running:
                self.status = "done"
            if self.error:
                self.note(f"error: {self.error}")

    def _train(self) -> None:
        from engine.train import train

        plan = self.plan
        sd_model = host.loaded_model()
        reason = host.refusal(sd_model, train_text_encoder=plan.cfg.train_text_encoder)
        if reason:
            raise ModelError(reason)
        plan.cfg = self._fit_to_model(plan.cfg)
        merged = host.unmerge_builtin_loras(sd_model)
        if merged:
            self.note(f"un-merged the LoRA(s) of the last generation before training: {', '.join(merged)}")
        model = host.trainable_model(sd_model, clip_skip=plan.cfg.clip_skip)
        self.preview_size = plan.cfg.resolution_wh(model.info.resolution)
        result = train(plan.cfg, model, callbacks=[self])
        self.output_dir = result.output_dir
        self.status = "saving"
        self.lora_file = self._publish(Path(result.lora_path), plan.name)
        self.note(f"saved {self.lora_file}; use <lora:{self.lora_file.stem}:0.8> in a prompt")
        if plan.previews.strengths and not self.should_stop():
            self._previews(plan.previews, result.output_dir)
        host.refresh_lora_list()

    def _previews(self, settings: PreviewSettings, work_folder: Path) -> None:
        """`<lora:name:S>` for each strength; the one nearest 0.8 becomes the card image."""
        self.status = "previews"
        shots = strength_previews(self.lora_file.stem, settings, self.lora_file, work_folder, self.preview_size)
        self.card_preview, self.strength_grid = shots.card, shots.grid_path
        with self._lock:
            self.preview_images += [(im, f"<lora:{self.lora_file.stem}:{s}>") for im, s
                                    in zip(shots.images, shots.labels)]

    def _fit_to_model(self, cfg: TrainConfig) -> TrainConfig:
        """Settings the loaded model decides: its weight dtype sets the precision, the WebUI's CLIP skip
        applies unless the request set one."""
        from modules import devices, shared

        changes = {}
        precision = PRECISION_OF.get(str(getattr(devices, "dtype_unet", "torch.float32")), "no")
        if cfg.mixed_precision != precision:
            if cfg.mixed_precision != "auto":
                self.note(f"mixed_precision {cfg.mixed_precision} ignored: the loaded model computes in "
                          f"{precision if precision != 'no' else 'fp32'}")
            changes["mixed_precision"] = precision
        skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        if not cfg.clip_skip and skip > 1:
            changes["clip_skip"] = skip
        return cfg.replace(**changes) if changes else cfg

    def _publish(self, source: Path, stem: str) -> Path:
        """Copy a LoRA into the Lora folder under a name not used before (atomic: temp + rename)."""
        lora_dir = self.plan.lora_dir
        name = host.unique_name(stem, [lora_dir])
        target = lora_dir / f"{name}.safetensors"
        atomic_write_bytes(target, source.read_bytes())
        return target

    def _keep_stopped_file(self) -> None:
        """Publish the LoRA of the last step with a card image (one `<lora:name:0.8>`-nearest preview,
        rendered after the stop, as a finished run's card is), and say how to continue. The status turns
        "stopped" last, so a watcher that ends on it has seen the message."""
        self.status = "saving"
        if not (self.last_checkpoint_lora and Path(self.last_checkpoint_lora).is_file()):
            self.note("stopped before the first step; nothing was saved.")
            self.status = "stopped"
            return
        source = Path(self.last_checkpoint_lora)
        try:
            self.lora_file = self._publish(source, source.stem)
        except OSError as exc:
            self.note(f"stopped at step {self.step}; could not copy the checkpoint's LoRA: {exc}")
            self.status = "stopped"
            return
        settings = self.plan.previews
        if settings.strengths and self.preview_size:
            card = min(settings.strengths, key=lambda s: abs(s - 0.8))
            host.state().interrupted = False  # the stop was for training; the card is one short render
            try:
                self._previews(replace(settings, strengths=(card,)), source.parent)
            except Exception as exc:  # the LoRA is safe in the Lora folder; a card is a nicety
                logger.warning("LoRA Trainer: no card image for the stopped run: %s", exc)
        host.refresh_lora_list()
        self.note(stopped_message(self.step, self.stopped_checkpoint, self.lora_file, self.controls))
        self.status = "stopped"

    # --- reporting --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        with self._lock:
            losses, messages, validation = list(self.losses), list(self.messages), list(self.validation)
            captions = [c for _, c in self.preview_images]
        return {"id": self.id, "status": self.status, "running": self.running, "step": self.step,
                "total_steps": self.total, "loss": losses[-1][1] if losses else None,
                "losses": [[s, v] for s, v in losses], "validation": [[s, v] for s, v in validation],
                "messages": messages, "error": self.error,
                "lora_name": self.lora_file.stem if self.lora_file else self.plan.name,
                "lora_file": str(self.lora_file) if self.lora_file else None,
                "card_preview": str(self.card_preview) if self.card_preview else None,
                "strength_grid": str(self.strength_grid) if self.strength_grid else None,
                "output_dir": str(self.output_dir or Path(self.plan.cfg.output_dir) / self.plan.name),
                "previews": captions, "started": self.started, "finished": self.finished}


class JobManager:
    def __init__(self):
        self.job: TrainJob | None = None
        self._lock = threading.Lock()

    def start(self, request: dict, *, background: bool = True, controls: Controls = API) -> TrainJob:
        with self._lock:
            if self.job is not None and self.job.running:
                raise JobBusy(f"a LoRA is already training ({self.job.plan.name}, step {self.job.step}/"
                              f"{self.job.total}); stop it or wait for it to finish.")
            plan = make_plan(request, lora_dir=host.lora_dir(), work_dir=host.work_dir(), controls=controls)
            loaded = host.peek_model()
            reason = loaded is not None and host.refusal(loaded, train_text_encoder=plan.cfg.train_text_encoder)
            if reason:
                raise ModelError(reason)
            job = TrainJob(plan, controls)
            self.job = job
        if background:
            job.thread = threading.Thread(target=job.run, name=f"lora-trainer-{job.id}", daemon=True)
            job.thread.start()
        else:
            job.run()
        return job

    def stop(self) -> bool:
        job = self.job
        if job is None or not job.running:
            return False
        job.stop_requested = True
        if job.has_lock:
            host.state().interrupt()
        return True

    def status(self) -> dict:
        job = self.job
        return job.to_dict() if job is not None else {"status": "idle", "running": False}


MANAGER = JobManager()
