"""Engine events -> what a ComfyUI user sees while the trainer node runs.

Every step: ComfyUI's progress bar (whose hook also raises when Cancel was pressed), an interrupt
check of our own (the hook is absent outside the server), and an `inplace_lora.progress` message with
the loss and learning rate for the chart in web/; each validation adds the run's (step, validation loss)
pairs, which the chart draws as a second series. Previews are saved in ComfyUI's temp folder and
shown by the same chart widget (not as the progress bar's preview, which would draw a second,
upscaled copy over the node and vanish on reload). The run's history is also kept here, per node, so a
reloaded page can redraw the chart (GET /inplace_lora/history), and in the run folder
(`loss_history.json`, written with every checkpoint and when the run ends), so a resumed run's chart
starts with the steps (and validation points) before the checkpoint, also after ComfyUI was restarted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from ..engine.events import TrainEvent

logger = logging.getLogger("inplace_lora_trainer")
EVENT = "inplace_lora.progress"
ROUTE = "/inplace_lora/history"
HISTORY_FILE = "loss_history.json"
RESUME_HINT = "switch on `resume` on the LoRA Trainer node and run again to continue"
_MAX_RUNS = 32

_lock = threading.Lock()
HISTORY: dict[str, dict] = {}  # node id -> the last run on that node


def history(node: str | None = None) -> dict:
    with _lock:
        if node is not None:
            return dict(HISTORY.get(str(node), {}))
        return {k: dict(v) for k, v in HISTORY.items()}


def _send(data: dict) -> None:
    try:
        from server import PromptServer

        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_sync(EVENT, data)
    except Exception as exc:  # the chart is a nicety; never fail a run for it
        logger.debug("could not send progress: %s", exc)


def _prompt_id() -> str | None:
    try:
        from server import PromptServer

        return getattr(PromptServer.instance, "last_prompt_id", None)
    except Exception:
        return None


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when Cancel was pressed (resets the flag)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class NodeProgress:
    """A TrainCallback for one trainer node run."""

    def __init__(self, node_id: str | None, name: str, run_folder: Path | None = None):
        self.node = str(node_id) if node_id is not None else "?"
        self.name = name
        self.run_folder = Path(run_folder) if run_folder is not None else None
        self.bar = None
        self.total = 0
        self.points: list[list[float]] = []  # [step, loss, lr]
        self.lrs: dict[int, float] = {}
        self.earlier_validation: list[list[float]] = []  # a resumed run's validation points before its checkpoint
        self.last_preview = None
        self.messages: list[str] = []
        self.started = time.monotonic()
        self.run = {"node": self.node, "name": name, "prompt_id": _prompt_id(), "status": "starting",
                    "total": 0, "step": 0, "points": self.points, "validation": [], "preview": None, "message": "",
                    "started": time.time()}
        with _lock:
            HISTORY[self.node] = self.run
            while len(HISTORY) > _MAX_RUNS:
                HISTORY.pop(next(iter(HISTORY)))
        _send({**self._public(), "points": []})

    def _public(self) -> dict:
        return {k: v for k, v in self.run.items() if k != "points"}

    def _update(self, **changes) -> None:
        with _lock:
            self.run.update(changes)

    def seconds_per_step(self) -> float:
        """Wall time per optimizer step since training started (caching excluded)."""
        done = getattr(self, "last_step", 0) - getattr(self, "first_step", 0)
        return (self.t_last - self.t_first) / done if done > 0 else 0.0

    # --- TrainCallback --------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return False

    def on_event(self, event: TrainEvent) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)
        if event.kind in ("step", "info", "caching"):
            check_interrupt()

    def _save_history(self) -> None:
        """The loss points so far, beside the checkpoints, for the chart of a later resumed run."""
        if self.run_folder is None or not self.run_folder.is_dir():
            return
        try:
            with _lock:
                saved = {"points": list(self.points), "validation": list(self.run["validation"])}
            (self.run_folder / HISTORY_FILE).write_text(json.dumps(saved), encoding="utf-8")
        except OSError as exc:  # the chart is a nicety; never fail a run for it
            logger.debug("could not write the loss history: %s", exc)

    def _earlier_points(self, step: int) -> tuple[list[list[float]], list[list[float]]]:
        """The loss points and validation points of the run this one resumes, up to its checkpoint's step
        (a file written before validation points were kept holds the loss points alone, as a list)."""
        try:
            saved = json.loads((self.run_folder / HISTORY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return [], []
        saved = saved if isinstance(saved, dict) else {"points": saved}

        def upto(points, size):
            return [p for p in points or [] if isinstance(p, list) and len(p) == size and p[0] <= step]

        return upto(saved.get("points"), 3), upto(saved.get("validation"), 2)

    def _on_start(self, event: TrainEvent) -> None:
        import comfy.utils

        resumed = event.step and self.run_folder is not None
        earlier, self.earlier_validation = self._earlier_points(event.step) if resumed else ([], [])
        with _lock:
            self.points[:0] = earlier
            self.run["resumed_at"] = event.step or None
            self.run["validation"] = list(self.earlier_validation)
        self.total = event.total_steps
        self.first_step, self.t_first = event.step, time.monotonic()
        self.bar = comfy.utils.ProgressBar(event.total_steps, node_id=self.node)
        if event.step:
            self.bar.update_absolute(event.step, event.total_steps)
        self._update(status="running", total=event.total_steps, step=event.step, message=event.message)
        self.messages.append(event.message)
        _send({**self._public(), "points": earlier})

    def _on_info(self, event: TrainEvent) -> None:
        self.messages.append(event.message)
        logger.info("LoRA Trainer: %s", event.message)
        self._show(event.message)

    def _on_caching(self, event: TrainEvent) -> None:
        self._show(event.message)  # on the node only: the summary and the log keep the run's notes

    def _show(self, message: str) -> None:
        self._update(message=message)
        _send({**self._public(), "points": []})

    def _on_step(self, event: TrainEvent) -> None:
        self.lrs[event.step] = event.lr
        new = [[s, loss, self.lrs.get(s, event.lr)] for s, loss in event.losses]
        with _lock:
            self.points.extend(new)
            self.run.update(step=event.step, status="running")
        self.last_step, self.t_last = event.step, time.monotonic()
        self.run["seconds_per_step"] = round(self.seconds_per_step(), 3)
        if self.bar is not None:
            self.bar.update_absolute(event.step, event.total_steps)
        _send({**self._public(), "points": new, "lr": event.lr, "loss": event.loss})

    def _on_validation(self, event: TrainEvent) -> None:
        """The chart's second series: every validation point so far (the engine's list counts from the
        start of this process' run; a resumed run's earlier points come first)."""
        with _lock:
            self.run["validation"] = self.earlier_validation + [[s, v] for s, v in event.losses]
        _send({**self._public(), "points": []})

    def _on_preview(self, event: TrainEvent) -> None:
        if not event.images:
            return
        image = event.images[0] if len(event.images) == 1 else _strip(event.images)
        self.last_preview = image
        saved = _save_temp(image, f"{self.node}_step{event.step:06d}")
        self._update(preview=saved)
        _send({**self._public(), "points": []})

    def _on_checkpoint(self, event: TrainEvent) -> None:
        self._update(checkpoint=event.path)
        self._save_history()

    def _on_done(self, event: TrainEvent) -> None:
        self._update(status="done", step=event.step, message=f"saved {event.path}")
        self._save_history()
        _send({**self._public(), "points": []})

    def _on_stopped(self, event: TrainEvent) -> None:
        message = f"{event.message}; {RESUME_HINT}" if event.path else event.message  # the engine's text is host-neutral
        self.messages.append(message)
        self._update(status="stopped", message=message, checkpoint=event.path)
        self._save_history()
        _send({**self._public(), "points": []})

    def _on_error(self, event: TrainEvent) -> None:
        self._update(status="error", message=event.message)
        self._save_history()
        _send({**self._public(), "points": []})


def _strip(images: list):
    from PIL import Image

    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h), "white")
    for i, img in enumerate(images):
        strip.paste(img.convert("RGB").resize((w, h)), (i * w, 0))
    return strip


def _save_temp(image, stem: str) -> dict | None:
    """Save a preview into ComfyUI's temp folder; returns the /view reference the web chart uses."""
    try:
        import folder_paths

        folder = Path(folder_paths.get_temp_directory()) / "inplace_lora"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{stem}.png"
        image.save(folder / name)
        return {"filename": name, "subfolder": "inplace_lora", "type": "temp"}
    except Exception as exc:
        logger.debug("could not save preview: %s", exc)
        return None


def register_routes() -> None:
    """GET /inplace_lora/history[?node=ID]: the last run of each trainer node (chart after a reload)."""
    from aiohttp import web
    from server import PromptServer

    routes = PromptServer.instance.routes

    @routes.get(ROUTE)
    async def get_history(request):
        node = request.rel_url.query.get("node")
        return web.json_response(history(node))
