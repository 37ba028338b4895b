"""Console progress for the CLI: a tqdm bar with loss, lr and it/s, plus the run's messages."""

from __future__ import annotations

from .events import TrainEvent


class ConsoleProgress:
    def __init__(self):
        self.bar = None
        self.stopped_message = ""

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
            self.stopped_message = f"Checkpoint kept at {event.path}." if event.path else ""
        elif event.kind == "info" and not event.message.startswith("caching "):
            self._write(event.message)

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


def train_in_console(train, argv: list[str]):
    """`train(callbacks)` with the console bar; on Ctrl-C, say what was kept and how to resume, and return
    None (the command exits with 130). Otherwise print the run's warnings and return its result."""
    progress = ConsoleProgress()
    try:
        result = train([progress])
    except KeyboardInterrupt:
        progress.close()
        print(f"\nstopped. {progress.stopped_message or 'No step had finished, so nothing was saved.'}\n"
              f"Resume with: python -m engine train {' '.join(argv)} --set resume_from_checkpoint=latest")
        return None
    finally:
        progress.close()
    for warning in result.warnings:
        print(f"warning: {warning}")
    return result
