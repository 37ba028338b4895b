"""What the tab's buttons do, without Gradio: turn the form into a request, start/resume/stop/watch
the job, caption and check the dataset, and format the status. `ui.py` only lays the components out and
binds these functions, so they are tested directly. Messages name the tab's own controls (resume.TAB).

The form's knobs are `KNOBS`, each a `TrainConfig` field; a preset fills them, the user edits them, and
the request carries all of them (so what the form shows is what trains).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from engine.config import NETWORK_TYPES, OPTIMIZERS, SCHEDULERS, TARGET_PRESETS, TrainConfig
from engine.errors import UserError

from .job import MANAGER
from .lossplot import render_loss_plot
from .presets import DEFAULT, apply_preset, load_presets
from .resume import TAB

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Knob:
    field: str
    label: str
    kind: str  # number | int | text | bool | choice | slider
    choices: tuple = ()
    minimum: float = 0
    maximum: float = 0
    step: float = 1
    placeholder: str = ""


KNOBS = (
    Knob("output_name", "LoRA name (never overwrites a file)", "text",
         placeholder="empty: the folder's name"),
    Knob("lora_rank", "Rank", "slider", minimum=1, maximum=128, step=1),
    Knob("lora_alpha", "Alpha (0 = rank/2)", "number"),
    Knob("learning_rate", "Learning rate", "number"),
    Knob("epochs", "Epochs", "int"),
    Knob("max_train_steps", "Max steps (0 = use epochs)", "int"),
    Knob("repeats", "Repeats (flat folders)", "int"),
    Knob("batch_size", "Batch size", "slider", minimum=1, maximum=16, step=1),
    Knob("resolution", "Resolution (auto = the model's)", "text"),
    Knob("target_modules", "Layers", "choice", choices=TARGET_PRESETS),
    Knob("network_type", "Network (LoRA, LoCon, LyCORIS LoHa / LoKr, DoRA)", "choice", choices=NETWORK_TYPES),
    Knob("optimizer", "Optimizer", "choice", choices=OPTIMIZERS),
    Knob("lr_scheduler", "LR schedule", "choice", choices=SCHEDULERS),
    Knob("train_text_encoder", "Train text encoder", "bool"),
    Knob("text_encoder_lr", "Text encoder LR", "number"),
    Knob("gradient_checkpointing", "Gradient checkpointing (less VRAM, slower)", "bool"),
    Knob("flip_aug", "Flip images", "bool"),
    Knob("shuffle_caption", "Shuffle tags", "bool"),
    Knob("keep_tokens", "Keep first N tags", "int"),
    Knob("min_snr_gamma", "Min-SNR gamma (0 = off)", "number"),
    Knob("save_every_n_epochs", "Checkpoint every N epochs", "int"),
    Knob("sample_every_n_epochs", "Preview every N epochs (0 = only at the end)", "int"),
    Knob("seed", "Seed", "int"),
    Knob("caption_tag_dropout_rate", "Tag dropout (0-1, per tag)", "number"),
    Knob("masked_loss", "Masked loss (<image>_mask.png)", "bool"),
    Knob("ema_decay", "EMA of the weights (0 = off, e.g. 0.999)", "number"),
    Knob("validation_split", "Validation split (0-1 held out)", "number"),
)
PREVIEW_FIELDS = ("preview_prompt", "preview_strengths", "preview_steps")


def knob_values(preset: str, presets: dict | None = None) -> list:
    """The form values for a preset: the schema's defaults overlaid with the preset's fields."""
    fields = apply_preset(preset or DEFAULT, {}, presets)
    cfg = TrainConfig(**{k: v for k, v in fields.items()})
    # the name starts empty: the dataset folder's name applies (the schema's "my_lora" is the CLI's)
    return ["" if k.field == "output_name" else _display(getattr(cfg, k.field)) for k in KNOBS]


def _display(value):
    return value if not isinstance(value, (list, tuple)) else ", ".join(str(v) for v in value)


def build_request(folder: str, trigger: str, preset: str, values: list, preview: list) -> dict:
    """Form -> API request. Empty texts are left out so the schema's defaults apply."""
    if len(values) != len(KNOBS):
        raise ValueError(f"expected {len(KNOBS)} knob values, got {len(values)}")
    request: dict = {"train_data_dir": (folder or "").strip(), "trigger_word": (trigger or "").strip()}
    if preset and preset != DEFAULT:
        request["preset"] = preset
    for knob, value in zip(KNOBS, values):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if knob.kind in ("int", "slider"):
            value = int(value)
        elif knob.kind == "number":
            value = float(value)
        request[knob.field] = value.strip() if isinstance(value, str) else value
    for name, value in zip(PREVIEW_FIELDS, preview):
        if value not in (None, ""):
            request[name] = value
    return request


_FIELD_LABELS = {**{k.field: k.label.split(" (")[0] for k in KNOBS}, "train_data_dir": "Dataset folder",
                 "trigger_word": "Trigger word"}


def for_tab(message: str) -> str:
    """An engine message worded for the form: config keys the form shows become their labels, and the
    CLI's `--set` / `--help-config` advice (the tab has no command line) is dropped."""
    message = re.sub(r" Fix the path in the config \(or --set [\w.]+=\.\.\.\)\.", " Fix the path in the form.",
                     message)
    message = re.sub(r" \(python -m engine train --help-config lists every key\.\)", "", message)
    return re.sub(r"(?<!')\b(" + "|".join(f for f in _FIELD_LABELS if "_" in f) + r")\b(?!')",
                  lambda m: f"'{_FIELD_LABELS[m[1]]}' ({m[1]})", message)


def markdown_text(text: str) -> str:
    """Plain text shown literally in Markdown: `<lora:name:0.8>` is not swallowed as an HTML tag, and `*`,
    `_`, backticks and brackets in paths or prompts do not turn into formatting."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", text)


def format_status(status: dict) -> str:
    if status.get("status") == "idle":
        return "No training yet."
    parts = [f"**{status['status'].capitalize()}**: {markdown_text(status.get('lora_name', ''))}"]
    if status.get("total_steps"):
        loss = status.get("loss")
        parts.append(f"step {status['step']}/{status['total_steps']}" + (f", loss {loss:.4f}" if loss else ""))
    text = " — ".join(parts)
    if status.get("error"):
        text += f"\n\n**Error:** {markdown_text(for_tab(status['error']))}"
    if status.get("lora_file") and not status.get("running"):
        text += f"\n\nSaved `{status['lora_file']}` — try `<lora:{status['lora_name']}:0.8>` in txt2img."
    messages = status.get("messages") or []
    if messages:
        text += "\n\n" + "\n".join(f"- {markdown_text(m)}" for m in messages[-6:])
    return text


def outputs(manager=MANAGER):
    """(status markdown, loss chart, gallery) for the current job."""
    status = manager.status()
    job = manager.job
    gallery = [] if job is None else [(im, cap) for im, cap in list(job.preview_images)]
    return format_status(status), render_loss_plot(status.get("losses") or [], status.get("validation")), gallery


def on_train(folder: str, trigger: str, preset: str, *rest, manager=MANAGER, poll: float = POLL_SECONDS,
             resume: bool = False):
    """Start a run and stream its progress until it ends (the run goes on if the page is closed)."""
    values, preview = list(rest[:len(KNOBS)]), list(rest[len(KNOBS):])
    try:
        request = build_request(folder, trigger, preset, values, preview)
        if resume:
            request["resume"] = True
        manager.start(request, controls=TAB)
    except (UserError, ValueError) as exc:
        yield f"**Not {'resumed' if resume else 'started'}:** {markdown_text(for_tab(str(exc)))}", None, []
        return
    yield from on_watch(manager=manager, poll=poll)


def on_resume(folder: str, trigger: str, preset: str, *rest, manager=MANAGER, poll: float = POLL_SECONDS):
    """Continue the last stopped run of this name (the form's name, or the folder's) from its checkpoint,
    with the form's settings (those a resume must keep are checked against the run's)."""
    yield from on_train(folder, trigger, preset, *rest, manager=manager, poll=poll, resume=True)


def on_watch(manager=MANAGER, poll: float = POLL_SECONDS):
    """Stream the current job's progress (also to re-attach after a page reload); an update is sent
    only when something changed, so the browser is not sent the same images every second."""
    last = object()  # nothing sent yet
    while True:
        job = manager.job
        running = job is not None and job.running  # read first: the update below then shows the end
        signature = None if job is None else (job.status, job.step, len(job.losses), len(job.messages),
                                              len(job.preview_images), job.error)
        if signature != last:
            yield outputs(manager)
            last = signature
        if not running:
            return
        time.sleep(poll)


def on_stop(manager=MANAGER) -> str:
    return ("Stopping after the current step; the last checkpoint is kept." if manager.stop()
            else "Nothing is training.")


def on_caption(folder: str, captioner: str, mode: str, trigger: str) -> str:
    from .captioning import caption_folder

    try:
        return caption_folder(folder, captioner, mode=mode, trigger=trigger)
    except UserError as exc:
        return f"Not captioned: {exc}"


def on_check(folder: str, trigger: str, preset: str, *values) -> str:
    from .captioning import check_folder

    try:
        return check_folder(build_request(folder, trigger, preset, list(values), []))
    except (UserError, ValueError) as exc:
        return f"Cannot check: {exc}"


def preset_names() -> list[str]:
    return list(load_presets())
