"""What the training loop tells the outside world, through one callback interface.

The CLI (tqdm, TensorBoard), the ComfyUI nodes (progress bar, live loss chart) and the A1111 tab
(`shared.state`) all subscribe to the same `TrainEvent`s. A subscriber may also ask the loop to stop:
`should_stop()` is polled once per step, and an exception raised from `on_event` (ComfyUI raises one
when the user presses Cancel) stops the run the same way. Either way the loop saves a checkpoint first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol


@dataclass
class TrainEvent:
    """One thing that happened. `kind` is one of:

    - "start":      total_steps, message (a one-line summary of the run)
    - "step":       step, total_steps, epoch, lr (UNet lr); loss (float) and losses ([(step, loss)]
                    since the last report) only on steps where the loss was read back from the GPU
                    (every step on the CPU, about twice a second on a GPU: reading it forces a sync)
    - "preview":    step, images (list of PIL images), prompts
    - "checkpoint": step, path (the checkpoint directory), lora_path (the LoRA file written with it)
    - "done":       step, path (the final LoRA file)
    - "stopped":    step, path (checkpoint to resume from), message
    - "error":      step, message
    - "caching":    step (latents and text outputs cached so far), total_steps (to cache), message
                    ("caching 3/40"): before training, while the dataset is encoded
    - "info":       message (warnings and notes worth showing)
    """

    kind: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    lr: float | None = None
    path: str | None = None
    lora_path: str | None = None
    message: str = ""
    images: list[Any] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


class TrainCallback(Protocol):
    def on_event(self, event: TrainEvent) -> None: ...

    def should_stop(self) -> bool: ...


class Callbacks:
    """Fans events out to several subscribers; any of them can stop the run."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self._callbacks = [c for c in callbacks if c is not None]

    def add(self, callback: Any) -> None:
        self._callbacks.append(callback)

    def emit(self, kind: str, **fields: Any) -> None:
        event = TrainEvent(kind=kind, **fields)
        for cb in self._callbacks:
            handler = getattr(cb, "on_event", None)
            if handler is not None:
                handler(event)

    def should_stop(self) -> bool:
        return any(getattr(cb, "should_stop", lambda: False)() for cb in self._callbacks)


class FunctionCallback:
    """Adapts a plain function `f(event)` (and an optional `stop()` predicate) to the interface."""

    def __init__(self, on_event=None, should_stop=None):
        self._on_event = on_event
        self._should_stop = should_stop

    def on_event(self, event: TrainEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def should_stop(self) -> bool:
        return bool(self._should_stop()) if self._should_stop is not None else False
