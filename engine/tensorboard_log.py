"""TensorBoard logging (`log_with: tensorboard`): loss and lr scalars, preview images.

A subscriber to the loop's events like any host, so logging never touches the hot path: it sees the
losses the loop already read back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .events import TrainEvent


def tensorboard_dir(cfg, run_folder: Path) -> Path:
    """<run folder>/logs, or kohya's <logging_dir>/<log_prefix><date-time> when logging_dir is set."""
    if not cfg.logging_dir:
        return Path(run_folder) / "logs"
    import time

    return Path(cfg.logging_dir).expanduser() / f"{cfg.log_prefix}{time.strftime('%Y%m%d%H%M%S')}"


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log_with: tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or remove log_with).") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_event(self, event: TrainEvent) -> None:
        if event.kind == "step":
            for step, loss in event.losses:
                self.writer.add_scalar("loss", loss, step)
            if event.lr is not None:
                self.writer.add_scalar("lr", event.lr, event.step)
        elif event.kind == "preview":
            for i, image in enumerate(event.images):
                self.writer.add_image(f"preview/{i}", np.asarray(image.convert("RGB")), event.step, dataformats="HWC")
        elif event.kind in ("done", "stopped", "error"):
            self.writer.flush()
            self.writer.close()

    def should_stop(self) -> bool:
        return False
