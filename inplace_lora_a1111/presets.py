"""Presets for the tab and the API: named dicts of `TrainConfig` fields.

They come from the repository's `configs/*.yaml` (the same files the command line uses), keeping only
the fields that describe *how* to train: paths, names and preview prompts belong to the user's run.
"Defaults" is the config schema's own defaults. A request applies its preset first, then its own
fields, so anything the user sets wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import TrainConfig, load_config

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT = "Defaults"
# Fields that belong to one run, never to a preset.
RUN_FIELDS = {"base_model", "train_data_dir", "metadata_path", "reg_data_dir", "output_dir", "output_name",
              "network_weights", "resume_from_checkpoint", "cache_dir", "sample_prompts", "trigger_word",
              "training_comment", "device", "log_with"}


def preset_from_config(cfg: TrainConfig) -> dict:
    """The fields of `cfg` that differ from the defaults and describe how to train."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in cfg.to_dict().items() if k not in RUN_FIELDS and v != defaults[k]}


def load_presets(folder: Path = CONFIG_DIR) -> dict[str, dict]:
    """{name: fields}; a preset file that does not parse is skipped with a warning, never fatal."""
    presets: dict[str, dict] = {DEFAULT: {}}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            presets[path.stem] = preset_from_config(load_config(path))
        except Exception as exc:  # a broken preset must not take the tab down
            logger.warning("preset %s skipped: %s", path.name, exc)
    return presets


def apply_preset(name: str, fields: dict, presets: dict[str, dict] | None = None) -> dict:
    """Preset fields overlaid with the request's fields (unknown preset: a clear error)."""
    presets = presets if presets is not None else load_presets()
    if name and name not in presets:
        from engine.errors import ConfigError

        raise ConfigError(f"preset {name!r} does not exist; choose one of: {', '.join(presets)}.")
    merged = dict(presets.get(name or DEFAULT, {}))
    merged.update(fields)
    return merged
