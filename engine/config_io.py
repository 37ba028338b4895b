"""How a config file or mapping becomes a `TrainConfig` (engine/config_fields.py), and back.

Keys may be flat or grouped in sections of any name (`model_config:`, kohya's `[training_arguments]`,
lora-scripts' `[saving]`); sections are flattened as kohya does, and a key set twice to different
values is an error. Keys users already write for kohya sd-scripts and lora-scripts are accepted
(engine/config_kohya.py says how each maps); what a config sets but this trainer does not use is
logged in one line. Every wrong key or value raises a `ConfigError` that says what is allowed.
`dump_config` writes the resolved config as grouped YAML, `describe_fields` the reference that
`--help-config` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from pathlib import Path
from typing import Any

from .config_fields import TrainConfig
from .config_kohya import translate
from .errors import ConfigError

logger = logging.getLogger("engine.config")

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_META = {name: f.metadata for name, f in _FIELDS.items()}
_ALIASES = {alias: name for name, meta in _META.items() for alias in meta["aliases"]}
_TYPES = typing.get_type_hints(TrainConfig)
# Keys kohya/lora-scripts users write whose meaning maps onto ours with a value change.
_SPECIAL = {
    "use_fp16": lambda v: {"mixed_precision": "fp16" if v else "no"},
    "v_parameterization": lambda v: {"prediction_type": "v_prediction" if v else "epsilon"},
    "xformers": lambda v: {"attention": "xformers" if v else "sdpa"},
    "enable_xformers": lambda v: {"attention": "xformers" if v else "sdpa"},
    "cache_latents_to_disk": lambda v: {"cache_latents": "disk"} if v else {},
    "sample_every_n_epochs_or_steps": lambda v: {},
}


# kohya keys whose value may be written as a mapping (not a section)
_MAPPING_VALUES = {"network_args", "lr_scheduler_args", "log_tracker_config"}


def config_from_mapping(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A validated TrainConfig from a (possibly grouped, aliased or kohya-style) mapping."""
    flat, sections = _flatten(data, source)
    values, notes = translate(flat, sections, source)
    cfg = TrainConfig(**{name: _coerce(name, value, source) for name, value in _canonical_keys(values, source).items()})
    cfg.validate(source)
    for note in notes:
        logger.info("%s: %s", source, note)
    return cfg


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """`cfg` with `--set key=value` overrides applied (values parsed as YAML: 1e-4, true, [a, b]).
    Any key a config file accepts works, kohya's too (`--set xformers=false`); an override replaces
    the setting it names."""
    import yaml

    raw: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (for example --set lora_rank=32)")
        key, value = item.split("=", 1)
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    flat, _ = _flatten(raw, "--set")
    values, _ = translate(flat, [], "--set", whole_config=False)
    data = cfg.to_dict()
    data.update(_canonical_keys(values, "--set"))
    return config_from_mapping(data, source="--set")


def _canonical_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = _canonical(key, source)
        if name in out and out[name] != value:
            raise ConfigError(f"{source}: '{name}' is given twice with different values ({out[name]!r} and "
                              f"{value!r}, e.g. as '{key}' and under another name); keep one.")
        out[name] = value
    return out


def _flatten(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Sections (any mapping that is not a mapping field's value: `[optimizer]` is a section, `optimizer:
    AdamW` the field) flattened, as kohya's --config_file does;
    returns (flat keys, section names)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of key: value, got {type(data).__name__}.")
    flat: dict[str, Any] = {}
    sections: list[str] = []

    def put(key: str, value: Any, where: str) -> None:
        if key in flat and flat[key] != value:
            raise ConfigError(f"{where}: '{key}' is set twice with different values ({flat[key]!r} and {value!r}); "
                              f"keep one.")
        flat[key] = value

    for key, value in data.items():
        key = str(key)
        if isinstance(value, dict) and _TYPES.get(_ALIASES.get(key, key)) is not dict and key not in _MAPPING_VALUES:
            sections.append(key)
            inner, deeper = _flatten(value, f"{source} [{key}]")
            sections += deeper
            for k, v in inner.items():
                put(k, v, f"{source} [{key}]")
        elif key in _SPECIAL:
            for k, v in _SPECIAL[key](value).items():
                put(k, v, source)
        else:
            put(key, value, source)
    return flat, sections


def _canonical(key: str, source: str, fields=None, aliases=None,
               listing: str = "python -m engine train --help-config") -> str:
    fields, aliases = (_FIELDS, _ALIASES) if fields is None else (fields, aliases)
    if key in fields:
        return key
    if key in aliases:
        return aliases[key]
    known = sorted(set(fields) | set(aliases))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{aliases.get(close[0], close[0])}'?" if close else ""
    raise ConfigError(f"{source}: unknown key '{key}'.{hint} ({listing} lists every key.)")


def _coerce(name: str, value: Any, source: str, meta=None, kind=None) -> Any:
    meta, kind = (_META[name], _TYPES[name]) if meta is None else (meta, kind)
    where = f"{source}: {name}"
    synonyms = meta["synonyms"]
    if synonyms and isinstance(value, (str, bool)):
        value = synonyms.get(value.strip().lower() if isinstance(value, str) else value, value)
    if isinstance(value, bool) and meta["from_bool"] is not None:  # kohya's `cache_latents: true`, `color_aug: true`
        value = meta["from_bool"][not value]
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no",
                                                                 "off", "0"):
            value = value.strip().lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be a whole number, got {value!r}.")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a whole number, got {value!r}.") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where} must be a whole number, got {value!r}.")
        value = int(as_float)
    elif kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}.") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
    elif kind is str:
        if value is None:
            value = ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be text, got {value!r}.")
        value = str(value)
    elif kind is dict:
        if value in (None, ""):
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (key: value), got {value!r}.")
    if meta["choices"] is not None and value not in meta["choices"]:
        lowered = {str(c).lower(): c for c in meta["choices"]}
        if str(value).lower() in lowered:
            value = lowered[str(value).lower()]
        else:
            allowed = ", ".join(repr(c) if c == "" else str(c) for c in meta["choices"])
            raise ConfigError(f"{where} is {value!r}; allowed: {allowed}.")
    if meta["minimum"] is not None and isinstance(value, (int, float)) and value < meta["minimum"]:
        raise ConfigError(f"{where} must be at least {meta['minimum']}, got {value!r}.")
    if name == "target_modules" and isinstance(value, (list, tuple)):
        value = [str(v) for v in value]
    if name == "sample_prompts" and isinstance(value, str):
        value = [value] if value else []
    return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (or JSON/TOML) config file, apply `--set` overrides, validate."""
    cfg = TrainConfig.from_dict(read_config_file(path), source=Path(path).name)
    return cfg.with_overrides(overrides) if overrides else cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (or JSON/TOML) config file holds, before any key is checked."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist.")
    text = p.read_text(encoding="utf-8-sig")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        return yaml.safe_load(text) or {}
    except Exception as exc:  # the parser's own message says where
        raise ConfigError(f"cannot parse {p.name}: {exc}") from None


def dump_config(cfg) -> str:
    """YAML of the resolved config (this table's or another built with `config_field`), grouped as its
    fields are, as written next to the output."""
    import yaml

    groups: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cfg):
        groups.setdefault(f"{f.metadata['group']}_config", {})[f.name] = getattr(cfg, f.name)
    return yaml.safe_dump(groups, sort_keys=False, allow_unicode=True)


def describe_fields(table=TrainConfig) -> str:
    """Plain-text reference of every key of `table` (for --help-config and the README)."""
    lines = []
    for f in dataclasses.fields(table):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        alias = f" (also: {', '.join(meta['aliases'])})" if meta["aliases"] else ""
        lines.append(f"{meta['group']:8} {f.name} = {default!r}{alias}\n          {meta['help']}")
    return "\n".join(lines)


def flatten_groups(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with its sections flattened (for another field table, the text mode's)."""
    return _flatten(data, source)[0]


# The key rules and value coercion for another table (engine/text/config.py), imported rather than copied.
canonical_key, coerce_value = _canonical, _coerce
