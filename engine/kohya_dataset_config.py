"""kohya's `dataset_config` file ([general], [[datasets]], [[datasets.subsets]]) as config keys of ours.

kohya's documented way to describe the images (sd-scripts docs/config_README-en.md) is a second TOML
that `--dataset_config` points at. The common case, one dataset with one image folder (and optionally
one regularisation folder), maps onto `train_data_dir`, `repeats`, `reg_data_dir`, `resolution`,
`batch_size` and the caption/bucket/augmentation keys; the more specific level wins, as in kohya
(subset over dataset over [general]). Several datasets or several training folders are refused with
what to do instead: this trainer reads one folder, whose kohya `N_name` subfolders are its subsets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

_DATASET_KEYS = {"batch_size": "train_batch_size"}
_SUBSET_ONLY = {"image_dir", "is_reg", "num_repeats", "class_tokens", "metadata_file", "cache_info"}


def read_dataset_config(path: str | Path, source: str) -> tuple[dict[str, Any], list[str]]:
    """Config keys (kohya names) for the dataset `path` describes, and notes for the summary line."""
    p = Path(str(path)).expanduser()
    where = f"{source}: dataset_config '{path}'"
    if not p.is_file():
        raise ConfigError(f"{where} does not exist.")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text(encoding="utf-8-sig"))
        else:
            import tomllib

            data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except Exception as exc:  # the parser's own message says where
        raise ConfigError(f"{where} cannot be parsed: {exc}") from None
    datasets = data.get("datasets") or []
    if len(datasets) != 1:
        raise ConfigError(f"{where} has {len(datasets)} [[datasets]]; one is read here (one resolution and batch "
                          f"size per run). Train the datasets one after another, or merge them into one.")
    general = {k: v for k, v in (data.get("general") or {}).items()}
    dataset = {k: v for k, v in datasets[0].items() if k != "subsets"}
    subsets = [{**general, **dataset, **s} for s in datasets[0].get("subsets") or []]
    train = [s for s in subsets if not s.get("is_reg")]
    reg = [s for s in subsets if s.get("is_reg")]
    if len(train) != 1 or len(reg) > 1:
        raise ConfigError(f"{where} has {len(train)} training and {len(reg)} regularisation subsets; one of each "
                          f"is read here. Put the training folders side by side as kohya 'N_name' subfolders of "
                          f"one folder (N = num_repeats, name = class_tokens) and set train_data_dir to it.")
    subset, notes = train[0], []
    if "image_dir" not in subset:
        raise ConfigError(f"{where}: the training subset has no image_dir.")
    out: dict[str, Any] = {"train_data_dir": subset["image_dir"]}
    if "num_repeats" in subset:
        out["repeats"] = subset["num_repeats"]
    if subset.get("metadata_file"):
        meta = str(subset["metadata_file"])
        if not meta.lower().endswith((".jsonl", ".csv")):
            raise ConfigError(f"{where}: metadata_file '{meta}' is kohya's fine-tuning JSON, which is not read here; "
                              f"write metadata.jsonl lines like {{\"file_name\": \"img01.jpg\", \"text\": \"a caption\"}}.")
        out["metadata_path"] = meta
    if subset.get("class_tokens"):
        notes.append(f"dataset_config class_tokens '{subset['class_tokens']}' is not used: an image without a caption "
                     f"file trains with an empty caption here (the dataset report names them); give it a .txt "
                     f"caption, or name its folder '{subset.get('num_repeats', 1)}_{subset['class_tokens']}'")
    if reg:
        if "image_dir" not in reg[0]:
            raise ConfigError(f"{where}: the regularisation subset has no image_dir.")
        out["reg_data_dir"] = reg[0]["image_dir"]
    for key, value in subset.items():
        if key in _SUBSET_ONLY:
            continue
        if key == "resolution" and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[_DATASET_KEYS.get(key, key)] = value
    return out, notes
