"""kohya sd-scripts and lora-scripts configs: what each of their keys means here.

People arrive with the `config.toml` they gave kohya's `train_network.py --config_file` or
lora-scripts (`config/default.toml`, `config/lora.toml`): sectioned TOML that kohya flattens, with
kohya's own key names and semantics. Every key kohya's `train_network.py` / `sdxl_train_network.py`
accept (sd-scripts 48d368f, tests/engine/fixtures/kohya_train_network_keys.txt) is one of:

- a field or alias of ours (engine/config_fields.py), e.g. `network_dim` -> `lora_rank`;
- converted here, where the meaning maps with a value change (`network_module`/`network_args`,
  `xformers`, `optimizer_args` as `key=value` strings, `save_n_epoch_ratio`, ...);
- `IGNORED`: changes only speed, memory, logging or uploads; a config that sets one gets one line
  naming each with the reason;
- `UNSUPPORTED`: changes what is learned in a way this trainer does not do; accepted when off,
  refused with what to do instead when on (never silently dropped).

kohya's semantics are kept where users rely on them: a kohya-style config (kohya sections or keys)
trains the text encoder unless `network_train_unet_only` is set, with `learning_rate` when no
`text_encoder_lr` is given; `unet_lr` and `learning_rate` that disagree are an error.
"""

from __future__ import annotations

import ast
import math
from typing import Any

from .errors import ConfigError

# lora-scripts' config/default.toml section names; kohya's own are `*_arguments`.
KOHYA_SECTIONS = {"additional_network", "sample_prompt", "saving", "others", "logging"}
# Keys only a kohya / lora-scripts config has: their presence turns on kohya's semantics.
KOHYA_MARKERS = {"network_module", "network_args", "network_train_unet_only", "network_train_text_encoder_only",
                 "save_model_as"}

_MEMORY = "memory and speed are managed by the trainer"
IGNORED: dict[str, str] = {
    "lowram": _MEMORY, "highvram": _MEMORY, "full_fp16": "LoRA weights and optimizer states stay float32 (small)",
    "full_bf16": "LoRA weights and optimizer states stay float32 (small)",
    "fp16_master_weights_and_gradients": "LoRA weights and optimizer states stay float32 (small)",
    "fused_backward_pass": _MEMORY, "mem_eff_attn": "PyTorch SDPA is used",
    "sdpa": "PyTorch SDPA is the default attention", "max_data_loader_n_workers": "images load in a background thread",
    "persistent_data_loader_workers": "images load in a background thread",
    "disable_mmap_load_safetensors": _MEMORY,
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory",
    "cache_info": "latent caches are keyed on each image's content and the VAE's weights",
    "skip_cache_check": "latent caches are keyed on each image's content and the VAE's weights",
    "deepspeed": "several GPUs: accelerate launch --multi_gpu --num_processes N -m engine train",
    "zero_stage": "no DeepSpeed", "offload_optimizer_device": "no DeepSpeed", "offload_optimizer_nvme_path": "no DeepSpeed",
    "offload_param_device": "no DeepSpeed", "offload_param_nvme_path": "no DeepSpeed", "zero3_init_flag": "no DeepSpeed",
    "zero3_save_16bit_model": "no DeepSpeed",
    "ddp_gradient_as_bucket_view": "several GPUs average gradients themselves",
    "ddp_static_graph": "several GPUs average gradients themselves",
    "dynamo_backend": "torch_compile uses inductor", "console_log_level": "console output is fixed",
    "console_log_file": "console output is fixed", "console_log_simple": "console output is fixed",
    "log_tracker_name": "only TensorBoard logging", "log_tracker_config": "only TensorBoard logging",
    "wandb_api_key": "only TensorBoard logging", "wandb_run_name": "only TensorBoard logging",
    "log_config": "the resolved config is written next to the LoRA as <name>.config.yaml",
    "output_config": "the resolved config is written next to the LoRA as <name>.config.yaml",
    "config_file": "this file is the config", "tokenizer_cache_dir": "the CLIP tokenizer is built in",
    "huggingface_repo_id": "nothing is uploaded", "huggingface_repo_type": "nothing is uploaded",
    "huggingface_path_in_repo": "nothing is uploaded", "huggingface_token": "nothing is uploaded",
    "huggingface_repo_visibility": "nothing is uploaded", "save_state_to_huggingface": "nothing is uploaded",
    "resume_from_huggingface": "nothing is downloaded", "async_upload": "nothing is uploaded",
    "save_state": "a checkpoint (LoRA, optimizer, scheduler, RNG, data position) is written with every save",
    "save_state_on_train_end": "Ctrl-C and Cancel keep a checkpoint; a finished run has its LoRA",
    "save_last_n_epochs_state": "checkpoints are kept by save_last_n_checkpoints",
    "save_last_n_steps_state": "checkpoints are kept by save_last_n_checkpoints",
    "no_metadata": "kohya's ss_* metadata is always written (loaders and galleries read it)",
    "metadata_title": "modelspec metadata comes from the run", "metadata_author": "modelspec metadata comes from the run",
    "metadata_description": "modelspec metadata comes from the run",
    "metadata_license": "modelspec metadata comes from the run", "metadata_tags": "modelspec metadata comes from the run",
    "metadata_trigger_phrase": "the trigger phrase is trigger_word",
    "metadata_usage_hint": "modelspec metadata comes from the run",
    "metadata_thumbnail": "the preview image is written beside the file",
    "metadata_merged_from": "modelspec metadata comes from the run",
    "metadata_preprocessor": "modelspec metadata comes from the run",
    "metadata_is_negative_embedding": "modelspec metadata comes from the run",
    "v2": "the family (SD1.x, SD2.x, SDXL) is read from the weights",
    "dim_from_weights": "a network_weights file's own rank is always used",
    "sample_sampler": "previews use DDIM here (the host's sampler in ComfyUI and A1111)",
    "sample_at_first": "previews are made at the set interval and at the end",
    "resize_interpolation": "images are resized with Lanczos",
    "debug_dataset": "python -m engine check DIR reports on the dataset",
    "huber_c": "loss_type is l2", "huber_scale": "loss_type is l2", "huber_schedule": "loss_type is l2",
    "lr_decay_steps": "only with kohya's warmup_stable_decay schedule",
}

_OURS = "; remove it (or set it off) to train here"
UNSUPPORTED: dict[str, str] = {
    "model_prediction_type": "Flux.1 trains on the raw velocity, as kohya's Flux guide recommends; set it to raw "
                             "or remove it",
    "network_train_text_encoder_only": "the UNet LoRA is always trained" + _OURS,
    "loss_type": "only the l2 (MSE) loss is implemented" + _OURS,
    "adaptive_noise_scale": "adaptive noise scale is not implemented; noise_offset is" + _OURS,
    "noise_offset_random_strength": "a random noise-offset strength is not implemented" + _OURS,
    "min_timestep": "the timestep range is always the whole schedule" + _OURS,
    "max_timestep": "the timestep range is always the whole schedule" + _OURS,
    "debiased_estimation_loss": "debiased estimation is not implemented; min_snr_gamma is" + _OURS,
    "scale_v_pred_loss_like_noise_pred": "v-prediction loss scaling is not implemented" + _OURS,
    "v_pred_like_loss": "v-prediction-like loss is not implemented" + _OURS,
    "zero_terminal_snr": "a zero-terminal-SNR schedule is used only for checkpoints that carry the 'ztsnr' key" + _OURS,
    "weighted_captions": "prompt weighting in captions is not implemented" + _OURS,
    "face_crop_aug_range": "face crops are not implemented" + _OURS,
    "caption_prefix": "use trigger_word (put first in every caption)",
    "caption_suffix": "append it to the captions themselves" + _OURS,
    "token_warmup_step": "token warm-up is not implemented" + _OURS,
    "token_warmup_min": "token warm-up is not implemented" + _OURS,
    "enable_wildcard": "wildcard captions are not implemented" + _OURS,
    "keep_tokens_separator": "use keep_tokens (a tag count)",
    "secondary_separator": "captions are split on commas only" + _OURS,
    "caption_separator": "captions are split on commas only" + _OURS,
    "in_json": "kohya's fine-tuning metadata JSON is not read; write metadata.jsonl (file_name, text) and set "
               "metadata_path",
    "dataset_class": "custom dataset classes are not loaded" + _OURS,
    "dataset_repeats": "set repeats",
    "vae": "a separate VAE file is not loaded; use a checkpoint with the VAE baked in",
    "base_weights": "merging other LoRAs into the base is not implemented" + _OURS,
    "base_weights_multiplier": "merging other LoRAs into the base is not implemented" + _OURS,
    "scale_weight_norms": "max-norm regularisation is not implemented" + _OURS,
    "lr_scheduler_type": "custom scheduler classes are not loaded; set lr_scheduler",
    "lr_scheduler_args": "scheduler arguments are not read; lr_scheduler_num_cycles and lr_scheduler_power are",
    "lr_scheduler_timescale": "the inverse-sqrt schedule is not implemented" + _OURS,
    "lr_scheduler_min_lr_ratio": "a minimum learning rate is not implemented" + _OURS,
    "initial_epoch": "continue a run with resume_from_checkpoint: latest",
    "initial_step": "continue a run with resume_from_checkpoint: latest",
    "skip_until_initial_step": "continue a run with resume_from_checkpoint: latest",
}
# Keys `translate` rewrites into ours (beyond the fields' aliases).
CONVERTED = frozenset({"network_module", "network_args", "network_train_unet_only", "use_8bit_adam", "use_lion_optimizer",
                       "save_model_as", "save_last_n_epochs", "save_last_n_steps", "save_n_epoch_ratio", "unet_lr",
                       "dataset_config"})
# kohya's defaults that mean "off" although they are not false/0/empty.
_KOHYA_OFF = {"loss_type": "l2", "caption_separator": ",", "token_warmup_min": 1, "dynamo_backend": "inductor",
              "multires_noise_discount": 0.3, "huber_c": 0.1, "huber_scale": 1.0, "huber_schedule": "snr",
              "zero_stage": 2, "dataset_repeats": 1, "resize_interpolation": "lanczos", "model_prediction_type": "raw"}

# network_args of networks.lora / lycoris.kohya that map onto ours; the rest are refused by name.
_NETWORK_ARGS = {"conv_dim": "conv_rank", "conv_rank": "conv_rank", "conv_alpha": "conv_alpha",
                 "dropout": "lora_dropout",
                 **{k: k for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
                                   "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")}}
# Defaults that differ from kohya's, named when a kohya-style config leaves them unset.
_DIFFERENT_DEFAULTS = {"lora_alpha": ("network_alpha", "rank/2", "1"), "lr_scheduler": ("lr_scheduler", "cosine", "constant"),
                       "warmup_steps": ("lr_warmup_steps", "5% of the run", "0"),
                       "min_snr_gamma": ("min_snr_gamma", "5", "off")}


def is_off(key: str, value: Any) -> bool:
    """True for a value that means "not used" in kohya (false, 0, empty, None, or kohya's default)."""
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    return key in _KOHYA_OFF and value == _KOHYA_OFF[key]


def is_kohya_style(flat: dict[str, Any], sections: list[str]) -> bool:
    return any(s in KOHYA_SECTIONS or s.endswith("_arguments") for s in sections) or bool(KOHYA_MARKERS & set(flat))


def kv_list(value: Any, key: str, source: str) -> dict[str, Any]:
    """kohya's `["conv_dim=8", "algo=locon"]` (or a mapping) as a dict; values as Python literals when
    they are one (kohya reads optimizer_args with ast.literal_eval), else as text."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: {key} must be a list of key=value strings, e.g. [\"conv_dim=8\"], got {value!r}.")
    out: dict[str, Any] = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{source}: {key} entries are key=value strings, e.g. \"conv_dim=8\"; got {item!r}.")
        k, raw = (s.strip() for s in item.split("=", 1))
        try:
            out[k] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[k] = raw
    return out


def translate(flat: dict[str, Any], sections: list[str], source: str, *, whole_config: bool = True
              ) -> tuple[dict[str, Any], list[str]]:
    """kohya keys in `flat` rewritten as ours; returns (mapping, notes for the one summary line).
    `whole_config` False (a `--set` override): kohya's whole-config semantics are left to the file."""
    data = dict(flat)
    notes: list[str] = []
    kohya = whole_config and is_kohya_style(data, sections)
    if data.get("dataset_config"):
        _dataset_config(data, source, notes)
    data.pop("dataset_config", None)
    ignored = []
    unet_only = data.pop("network_train_unet_only", None)
    for key in [k for k in data if k in IGNORED]:
        value = data.pop(key)
        if not is_off(key, value):
            ignored.append(f"{key}: {IGNORED[key]}")
    for key in [k for k in data if k in UNSUPPORTED]:
        value = data.pop(key)
        if not is_off(key, value):
            raise ConfigError(f"{source}: {key} = {value!r} is not supported here: {UNSUPPORTED[key]}.")
    _network(data, source, notes)
    _optimizer(data, source)
    _saving(data, source, ignored)
    _logging(data, ignored)
    if "unet_lr" in data and "learning_rate" in data and not _same(data["unet_lr"], data["learning_rate"]):
        raise ConfigError(f"{source}: unet_lr ({data['unet_lr']}) and learning_rate ({data['learning_rate']}) are both "
                          f"set and differ; they are the same setting here (the UNet's learning rate): keep one.")
    if "unet_lr" in data:
        data["learning_rate"] = data.pop("unet_lr")
    if unet_only is not None and "train_text_encoder" not in data:
        data["train_text_encoder"] = not unet_only
    if kohya:
        _kohya_semantics(data, notes)
    if ignored:
        notes.append("kohya keys accepted but not used here: " + "; ".join(ignored))
    return data, notes


def _dataset_config(data: dict[str, Any], source: str, notes: list[str]) -> None:
    from .kohya_dataset_config import read_dataset_config

    keys, more = read_dataset_config(data["dataset_config"], source)
    for key, value in keys.items():
        if key in data and data[key] != value:
            raise ConfigError(f"{source}: {key} is {data[key]!r} here but {value!r} in dataset_config "
                              f"'{data['dataset_config']}'; set it in one place.")
        data[key] = value
    notes += more


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return a == b


def _kohya_semantics(data: dict[str, Any], notes: list[str]) -> None:
    """kohya trains the text encoder unless network_train_unet_only, at learning_rate unless text_encoder_lr."""
    said = []
    if "train_text_encoder" not in data:
        data["train_text_encoder"] = True
        said.append("the text encoder is trained as kohya does (network_train_unet_only is not set)")
    if data["train_text_encoder"] and "text_encoder_lr" not in data and "learning_rate" in data:
        data["text_encoder_lr"] = data["learning_rate"]
        said.append(f"at learning_rate {data['learning_rate']} (no text_encoder_lr)")
    unset = [f"{kohya_key} {ours} (kohya: {theirs})" for field, (kohya_key, ours, theirs) in _DIFFERENT_DEFAULTS.items()
             if field not in data and kohya_key not in data]
    if said:
        notes.append("read as a kohya config: " + " ".join(said))
    if unset:
        notes.append("not set in this kohya config, so this trainer's defaults apply: " + ", ".join(unset))


def _network(data: dict[str, Any], source: str, notes: list[str]) -> None:
    from .lora.variants.lycoris_args import from_lycoris_args, truth  # LyCORIS' names live with the variants

    module = str(data.pop("network_module", "") or "networks.lora")
    args = kv_list(data.pop("network_args", None) or [], "network_args", source)
    if module == "lycoris.kohya":  # LoRA/LoCon, LoHa, LoKr, DoRA (engine/lora/variants/lycoris_args.py)
        alpha = next((data[k] for k in ("network_alpha", "lora_alpha", "alpha") if k in data), None)
        keys, more = from_lycoris_args(args, source, network_alpha=alpha)
        for key, value in keys.items():
            data.setdefault(key, value)
        notes += more
        return
    if module == "networks.lora_flux":  # kohya's Flux.1 LoRA: train_blocks all/double/single as our presets
        blocks = str(args.pop("train_blocks", "all")).lower()
        if blocks not in ("all", "double", "single"):
            raise ConfigError(f"{source}: network_args train_blocks={blocks} must be all, double or single.")
        data.setdefault("target_modules", "kohya" if blocks == "all" else blocks)
    elif module not in ("networks.lora", "networks.lora_sd", "lora"):
        raise ConfigError(f"{source}: network_module {module!r} is not supported; use networks.lora (LoRA, LoCon "
                          f"with network_args conv_dim) or lycoris.kohya (algo=locon, loha or lokr; dora_wd=True).")
    algo = str(args.pop("algo", "lora")).lower()
    if algo != "lora":
        raise ConfigError(f"{source}: network_args algo={algo} is LyCORIS' argument, which kohya's networks.lora "
                          f"does not read; set network_module = \"lycoris.kohya\" to train {algo}.")
    if truth(args.pop("dora_wd", False)):
        data.setdefault("network_type", "dora")
        notes.append("networks.lora with dora_wd=True trains DoRA (LyCORIS' dora_wd on LoRA; kohya's networks.lora "
                     "has no DoRA and would train plain LoRA)")
    for key, value in args.items():
        if key in ("verbose",):
            continue
        if key not in _NETWORK_ARGS:
            raise ConfigError(f"{source}: network_args {key}={value} is not supported here; supported: "
                              f"{', '.join(_NETWORK_ARGS)}, dora_wd. Remove it to train.")
        if isinstance(value, (list, tuple)):  # "block_dims=4,4,..." reads as a tuple: keep kohya's text
            value = ",".join(map(str, value))
        data.setdefault(_NETWORK_ARGS[key], value)
        if key in ("conv_dim", "conv_rank") and "target_modules" not in data:
            data["target_modules"] = "locon"


def _optimizer(data: dict[str, Any], source: str) -> None:
    if "optimizer_args" in data and not isinstance(data["optimizer_args"], dict):
        data["optimizer_args"] = kv_list(data["optimizer_args"] or [], "optimizer_args", source)
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if data.pop(flag, False):
            data.setdefault("optimizer_type", name)
    te_lr = data.get("text_encoder_lr")
    if isinstance(te_lr, (list, tuple)):
        values = {float(v) for v in te_lr}
        if len(values) > 1:
            raise ConfigError(f"{source}: text_encoder_lr {list(te_lr)} gives the text encoders different learning "
                              f"rates; here they share one: give a single value.")
        if values:
            data["text_encoder_lr"] = values.pop()
        else:
            del data["text_encoder_lr"]


def _saving(data: dict[str, Any], source: str, ignored: list[str]) -> None:
    fmt = str(data.pop("save_model_as", "safetensors") or "safetensors")
    if fmt != "safetensors":
        raise ConfigError(f"{source}: save_model_as {fmt!r}: LoRAs are written as .safetensors only; set "
                          f"save_model_as = \"safetensors\".")
    epochs_kept = data.pop("save_last_n_epochs", None)
    steps_kept = data.pop("save_last_n_steps", None)
    if epochs_kept:
        data.setdefault("save_last_n_checkpoints", epochs_kept)
    elif steps_kept:
        every = data.get("save_every_n_steps") or data.get("save_steps")
        if every:
            data.setdefault("save_last_n_checkpoints", max(1, math.ceil(int(steps_kept) / int(every))))
        else:
            ignored.append("save_last_n_steps: saves are kept by count, save_last_n_checkpoints")
    ratio = data.pop("save_n_epoch_ratio", None)
    if ratio:
        epochs = int(data.get("max_train_epochs") or data.get("epochs") or 10)
        data["save_every_n_epochs"] = max(1, epochs // int(ratio))
    prompts = data.get("sample_prompts")
    if isinstance(prompts, str) and prompts.lower().endswith((".toml", ".json")):
        raise ConfigError(f"{source}: sample_prompts '{prompts}' is a {prompts.rsplit('.', 1)[-1]} prompt file; "
                          f"here previews read a .txt file with one prompt per line (kohya's --n/--w/--h/--d/--l/--s "
                          f"options allowed).")


def _logging(data: dict[str, Any], ignored: list[str]) -> None:
    log_with = data.get("log_with")
    if log_with in ("wandb", "all"):
        ignored.append("log_with wandb: only TensorBoard logging")
        data["log_with"] = "tensorboard" if log_with == "all" else ""
    if data.get("logging_dir") and not log_with:
        data["log_with"] = "tensorboard"  # kohya logs to TensorBoard when logging_dir is set
