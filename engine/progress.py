"""Console progress for the CLI: a tqdm bar with loss, lr and it/s, plus the run's messages.

The engine's messages are host-neutral; what only the command line can say (how to resume here) is
added by this module.
"""

from __future__ import annotations

from .events import TrainEvent


RESUME_HINT = "resume with --set resume_from_checkpoint=latest"


def stopped_text(message: str, checkpoint: str | None, command: str = "") -> str:
    """The engine's "stopped at step N; checkpoint kept in ..." plus how to resume from the command line."""
    if not checkpoint:
        return f"{message or 'stopped before the first step'}; nothing was saved."
    how = f"python -m engine train {command} --set resume_from_checkpoint=latest" if command else RESUME_HINT
    return f"{message}; resume with: {how}" if command else f"{message}; {how}"


class ConsoleProgress:
    def __init__(self):
        self.bar = None
        self.stopped_message = ""  # the engine's own text of the last "stopped" event
        self.stopped_checkpoint: str | None = None
        self.shown: set[str] = set()  # messages already printed (the run's warnings are printed once)

    def on_event(self, event: TrainEvent) -> None:
        from tqdm.auto import tqdm

        if event.kind == "start":
            print(event.message)
            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True)
        elif event.kind == "step" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            if event.loss is not None:
                self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif event.kind == "checkpoint":
            self._write(f"checkpoint: {event.path} (LoRA: {event.lora_path})")
        elif event.kind == "preview":
            self._write(f"previews at step {event.step}")
        elif event.kind == "stopped":
            self.stopped_message, self.stopped_checkpoint = event.message, event.path
        elif event.kind == "info":
            self._write(event.message)
            self.shown.add(event.message)

    def should_stop(self) -> bool:
        return False

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_in_console(train, command: str):
    """`train(callbacks)` with the console bar; on Ctrl-C, say what was kept and how to resume (`command`:
    the arguments that started this run), and return None (the command exits with 130). Otherwise print
    the run's warnings not shown yet and return its result."""
    progress = ConsoleProgress()
    try:
        result = train([progress])
    except KeyboardInterrupt:
        progress.close()
        print("\n" + stopped_text(progress.stopped_message, progress.stopped_checkpoint, command))
        return None
    finally:
        progress.close()
    for warning in result.warnings:  # each once: most were printed when they arose
        if warning not in progress.shown:
            print(f"warning: {warning}")
    return result
