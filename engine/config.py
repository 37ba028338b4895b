"""The one training config: `TrainConfig` (the field table, engine/config_fields.py) and how files and
mappings become one (engine/config_io.py: groups, kohya keys, coercion, load/dump/describe).

Importers keep using `from engine.config import TrainConfig, load_config, dump_config, ...`.
"""

from .config_fields import NETWORK_TYPES, OPTIMIZERS, SCHEDULERS, TARGET_PRESETS, TrainConfig
from .config_fields import _f as config_field
from .config_io import canonical_key, coerce_value, describe_fields, dump_config, flatten_groups, load_config, \
    read_config_file
from .errors import ConfigError

__all__ = ["NETWORK_TYPES", "OPTIMIZERS", "SCHEDULERS", "TARGET_PRESETS", "ConfigError", "TrainConfig", "describe_fields",
           "dump_config", "load_config", "read_config_file",
           # the field helper, key rules and coercion, for another field table (the text mode's)
           "config_field", "canonical_key", "coerce_value", "flatten_groups"]
