"""Which training images are held out for the validation loss (kohya's `validation_split`).

A fraction of the training images (never regularisation images; at least one, and at least one left to
train on) is chosen by `validation_seed` (or `seed`): the same images on every run and on resume.
With `validation_data_dir` the validation images come from that folder instead and nothing is held out.
"""

from __future__ import annotations

import math
import random
from pathlib import Path


def held_out(records, cfg) -> set[Path]:
    """Paths of the training images kept out of training for validation (empty when none are)."""
    if cfg.validation_split <= 0 or cfg.validation_data_dir:
        return set()
    train = sorted({r.path for r in records if not r.is_reg})
    if len(train) < 2:
        return set()
    count = min(len(train) - 1, max(1, math.floor(len(train) * cfg.validation_split)))
    seed = cfg.validation_seed if cfg.validation_seed >= 0 else cfg.seed
    return set(random.Random(f"{seed}:validation").sample(train, count))
