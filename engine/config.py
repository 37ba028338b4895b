"""The one training config: `TrainConfig` (the field table, engine/config_fields.py) and how files and
mappings become one (engine/config_io.py: groups, kohya keys, coercion, load/dump/describe).

Importers keep using `from engine.config import TrainConfig, load_config, dump_config, ...`.
"""

from .config_fields import OPTIMIZERS, SCHEDULERS, TARGET_PRESETS, TrainConfig
from .config_io import describe_fields, dump_config, load_config
from .errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULERS", "TARGET_PRESETS", "ConfigError", "TrainConfig", "describe_fields",
           "dump_config", "load_config"]
