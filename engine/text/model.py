"""The local language model: its folder checked, its tokenizer and weights loaded, the PEFT LoRA attached.

Nothing is fetched: transformers runs with `local_files_only` and the hub switched off for the load. A
folder is checked before transformers sees it, so the common mistakes get a sentence instead of a
traceback: a single checkpoint file, a folder without config.json, one whose weights never finished
downloading, a LoRA adapter given as the base model, and a model whose code lives in the folder
(`auto_map`), which is refused unless `trust_remote_code: true` says to run it. The frozen weights are
loaded straight onto the training device in the training precision (bf16 on GPUs that have it), or in
8/4 bit through bitsandbytes when asked (CUDA only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..config_checks import missing_path
from ..errors import ConfigError, ModelError

logger = logging.getLogger(__name__)
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("task_type: text-generation needs peft: pip install peft") from None
    return peft


@contextlib.contextmanager
def offline():
    """The hub switched off while transformers and PEFT load (restored afterwards). huggingface_hub reads
    HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`, which its and transformers'
    `is_offline_mode()` return: that is switched too, or the variables would change nothing."""
    import huggingface_hub.constants as hub

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    saved_flag = hub.HF_HUB_OFFLINE
    os.environ.update({k: "1" for k in keys})
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder to load; a ModelError before PEFT sees a path it would take for a hub id."""
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise ModelError(f"'{p}' is not a LoRA adapter folder: it needs adapter_config.json and "
                         f"adapter_model.safetensors (the folder a text run saves). Nothing is downloaded.")
    return p


def check_model_folder(path: str | Path, trust_remote_code: bool) -> dict:
    """config.json of a usable causal-LM folder; a ModelError that says what to do otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(missing_path("base_model", str(path)))
    if p.is_file():
        raise ModelError(f"base_model '{p.name}' is a single file; text-generation needs a transformers model "
                         f"folder (config.json, tokenizer files, *.safetensors). GGUF and .ckpt files are not read: "
                         f"use the original Hugging Face folder of the model.")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise ModelError(f"'{p}' is a LoRA adapter, not a model: set base_model to the model it was trained on "
                         f"and network_weights to this folder to continue training it.")
    if not (p / "config.json").is_file():
        raise ModelError(f"'{p}' has no config.json, so it is not a transformers model folder. Point base_model "
                         f"at the folder that holds config.json and the *.safetensors files.")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{p / 'config.json'}' cannot be read ({exc}); the download may be broken.") from None
    weights = [f for pattern in WEIGHT_GLOBS for f in p.glob(pattern) if f.name not in ADAPTER_FILES]
    if not weights:
        raise ModelError(f"'{p}' has config.json but no weights (model.safetensors, model-00001-of-0000N"
                         f".safetensors or pytorch_model.bin): the download is probably incomplete. Download the "
                         f"weight files into that folder.")
    for index in p.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ModelError(f"'{p}' is missing {len(missing)} of the weight files {index.name} lists "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): finish the download.")
    if config.get("auto_map") and not trust_remote_code and not _native(config.get("model_type", "")):
        code = sorted(f.name for f in p.glob("*.py"))
        raise ModelError(f"'{p.name}' ({config.get('model_type', 'unknown type')}) runs its own Python code "
                         f"({', '.join(code) or 'named in auto_map'}). Read it, then set trust_remote_code: true "
                         f"to allow it.")
    return config


def _native(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def load_tokenizer(path: str | Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    with offline():
        try:
            return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer of '{path}': {str(exc).splitlines()[0]}. The folder needs "
                             f"its tokenizer files (tokenizer.json or tokenizer.model and tokenizer_config.json)."
                             ) from None


def quantization(cfg, device: torch.device, dtype: torch.dtype):
    """A BitsAndBytesConfig for load_in_8bit / load_in_4bit, or None."""
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return None
    which = "load_in_8bit" if cfg.load_in_8bit else "load_in_4bit"
    if device.type != "cuda":
        raise ConfigError(f"{which} needs a CUDA GPU (bitsandbytes); on {device.type} turn it off.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{which} needs bitsandbytes: pip install bitsandbytes (or turn {which} off).") from None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_model(cfg, device: torch.device, dtype: torch.dtype):
    """The causal LM on `device` in `dtype` (or quantised), in training mode, without a KV cache."""
    from transformers import AutoModelForCausalLM

    path = str(Path(cfg.base_model).expanduser())
    quant = quantization(cfg, device, dtype)
    kwargs = dict(local_files_only=True, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    with offline():
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError) as exc:
                if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
                    raise
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc) or "AutoModelForCausalLM" in str(exc):
                raise ModelError(f"'{Path(path).name}' is not a causal language model transformers can train "
                                 f"for text generation ({str(exc).splitlines()[0][:200]}).") from None
            raise
    if quant is None and device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    if quant is not None:
        peft = require_peft()
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_targets(model, setting) -> str | list[str]:
    """target_modules as PEFT takes it: attention -> q_proj/v_proj (or the layout's own attention
    projection), all-linear -> PEFT's all-linear, a list -> checked against the model's layers."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    if setting == "all-linear":
        return "all-linear"
    if setting == "attention":
        if {"q_proj", "v_proj"} <= names:
            return ["q_proj", "v_proj"]
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        found = defaults.get(getattr(model.config, "model_type", ""))
        if found:
            return list(found)
        raise ConfigError(f"this model has no q_proj/v_proj layers; list the attention layers in target_modules "
                          f"(its linear layers: {', '.join(sorted(names)[:12])}).")
    missing = [t for t in setting if t not in names and not any(n.endswith(t) for n in names)]
    if missing:
        raise ConfigError(f"target_modules: no layer named {', '.join(missing)} in this model; its linear layers "
                          f"are {', '.join(sorted(names)[:16])}.")
    return list(setting)


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")


def attach_lora(model, cfg, seed: int):
    """The PEFT model with a fresh LoRA (seeded), or the adapter in `network_weights` made trainable."""
    peft = require_peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.network_weights:
            adapter = check_adapter_folder(cfg.network_weights)
            with offline():
                wrapped = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
            loaded = wrapped.peft_config["default"]
            if (loaded.r, float(loaded.lora_alpha)) != (cfg.lora_rank, float(cfg.lora_alpha)):
                logger.info("continuing the adapter in %s at its own rank %s and alpha %s", cfg.network_weights,
                            loaded.r, loaded.lora_alpha)
        else:
            config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=resolve_targets(model, cfg.target_modules), bias="none",
                                     task_type="CAUSAL_LM")
            wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 masters, whatever the frozen weights are
    return wrapped
