"""Errors a user can act on.

Every failure the user can fix (a wrong path, a bad value, an unreadable image, a model of the wrong
family) raises a `UserError` whose message says what happened *and what to do*. Hosts show the
message as is: the CLI prints it without a traceback, ComfyUI shows it on the node, the A1111 tab in
its status line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, explained in words the user can act on."""


class ConfigError(UserError):
    """A key or value in the training config is wrong."""


class DatasetError(UserError):
    """The dataset folder, its images or its captions cannot be used."""


class ModelError(UserError):
    """The base model cannot be loaded or is not a family we train."""


class TrainingStopped(Exception):
    """Raised inside the loop when the user pressed Cancel/Stop or Ctrl-C.

    The loop saves a checkpoint before it propagates, so `checkpoint` names where the run can resume.
    """

    def __init__(self, message: str = "training stopped", checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
