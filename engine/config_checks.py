"""A TrainConfig's cross-field checks and path checks: what one field alone cannot say (a network
variant that has no dropout, a ratio that must stay below 1, a folder that is a file), each with the
value to set instead. The fields themselves, with their ranges and choices, are engine/config_fields.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config_fields import TARGET_PRESETS, field_meta
from .errors import ConfigError


def validate_config(cfg, source: str = "config") -> None:
    """Cross-field checks of a TrainConfig; per-field types and ranges were checked while coercing."""
    if cfg.task_type != "image":
        raise ConfigError(f"{source}: task_type {cfg.task_type} trains a language model from the command line "
                          f"(python -m engine train --config x.yaml); this path trains image LoRAs.")
    if cfg.caption_dropout > 1 or cfg.lora_dropout >= 1 or cfg.caption_tag_dropout_rate > 1:
        raise ConfigError(f"{source}: caption_dropout, caption_tag_dropout_rate and lora_dropout are "
                          f"probabilities (0 to 1).")
    if cfg.warmup_steps >= 1 and cfg.warmup_steps != int(cfg.warmup_steps):
        raise ConfigError(f"{source}: warmup_steps is a step count (e.g. 100) or a ratio below 1 "
                          f"(e.g. 0.05), not {cfg.warmup_steps}.")
    if isinstance(cfg.target_modules, str) and cfg.target_modules not in TARGET_PRESETS:
        raise ConfigError(f"{source}: target_modules must be one of {', '.join(TARGET_PRESETS)} or a "
                          f"list of module-name suffixes such as [to_q, to_k, to_v, to_out.0]; "
                          f"got {cfg.target_modules!r}.")
    if cfg.validation_split >= 1:
        raise ConfigError(f"{source}: validation_split is the fraction of images held out (e.g. 0.1), below 1.")
    if cfg.ema_decay >= 1:
        raise ConfigError(f"{source}: ema_decay is below 1 (e.g. 0.999), or 0 for no average; got {cfg.ema_decay}.")
    _validate_network(cfg, source)
    cfg.resolution_wh()  # raises on a malformed value
    if any(c in cfg.output_name for c in '/\\:*?"<>|') or cfg.output_name in ("", ".", ".."):
        raise ConfigError(f"{source}: output_name {cfg.output_name!r} must be a plain file name "
                          f"(no folders, no / \\ : * ? \" < > |).")


def _validate_network(cfg, source: str) -> None:
    """The LoRA-variant settings (engine/lora/variants/)."""
    if cfg.network_type == "locon" and cfg.target_modules == "kohya":
        cfg.target_modules = "locon"  # LoCon is LoRA on the locon layers
    if cfg.network_type in ("loha", "lokr", "dora") and cfg.lora_dropout:
        raise ConfigError(f"{source}: lora_dropout is for LoRA/LoCon; network_type {cfg.network_type} has "
                          f"none (LyCORIS implements none for LoHa/LoKr and ignores it for DoRA). Set it to 0.")
    if cfg.use_tucker:
        raise ConfigError(f"{source}: use_tucker (LyCORIS' Tucker/CP form of 3x3 kernels) is not supported; "
                          f"set it to false (the plain form loads in every host).")
    if cfg.lokr_factor == 0 or cfg.lokr_factor < -1:
        raise ConfigError(f"{source}: lokr_factor is -1 (the split closest to a square) or a whole number "
                          f"of at least 1, got {cfg.lokr_factor}.")


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf", ".json", ".toml", ".yaml",
                  ".txt", ".jsonl", ".csv")
_DATA_KEYS = ("train_data_dir", "reg_data_dir", "metadata_path", "validation_data_dir")


def looks_like_hub_id(key: str, value: str) -> bool:
    """`owner/name` where a model belongs, as people paste from Hugging Face; not a relative path to a
    file (`models/sd15.safetensors`) nor a data folder (`data/cats`), which are only missing."""
    value = str(value)
    return (key not in _DATA_KEYS and _HUB_ID.fullmatch(value) is not None
            and not value.startswith(".") and not value.lower().endswith(_FILE_SUFFIXES))


def missing_path(key: str, value: str) -> str:
    """What to say for a path that does not exist; a Hugging Face id is told that nothing is downloaded."""
    text = f"{key} points to '{value}', which does not exist. Fix the path in the config (or --set {key}=...)."
    if looks_like_hub_id(key, value):
        text += (f" '{value}' looks like a Hugging Face id: nothing is downloaded, so download the model first "
                 f"and give the path of its file or folder.")
    return text


def check_paths(cfg, *, need_base_model: bool) -> None:
    """Say which key of a TrainConfig points at a path that does not exist."""
    checks = [("train_data_dir", True), ("metadata_path", False), ("reg_data_dir", False),
              ("network_weights", False), ("base_model", need_base_model)]
    for key, required in checks:
        value = getattr(cfg, key)
        if not value:
            if required:
                raise ConfigError(f"{key} is not set: it must point to "
                                  f"{'your images folder' if key == 'train_data_dir' else 'a local checkpoint file or diffusers folder'}.")
            continue
        kind = field_meta(key)["path"]
        p = Path(value).expanduser()
        if not p.exists():
            raise ConfigError(missing_path(key, value))
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{key} must be a folder, but '{value}' is a file.")
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{key} must be a file, but '{value}' is a folder.")
