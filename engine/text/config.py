"""The text mode's config: the same YAML as image runs, with `task_type: text-generation`.

Its defaults are the ones lora-scripts' LLM guides give (rank 8, alpha 16, LoRA on `q_proj`/`v_proj`,
dropout 0.1) and the usual LLM LoRA learning rate of 2e-4. Keys, groups and value rules are the image
table's (engine/config.py's field helper, alias handling and coercion, imported); keys users of TRL and
LLaMA-Factory write are aliases. A key that only means something for image LoRAs (`resolution`,
`caption_extension`, ...) is named in one message instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (OPTIMIZERS, SCHEDULERS, TrainConfig, canonical_key, coerce_value, flatten_groups,
                      read_config_file)
from ..config import config_field as _f
from ..errors import ConfigError
from ..config_checks import missing_path

TASK_TYPE = "text-generation"
TARGET_PRESETS = {"attention": "q_proj, v_proj (or the attention projection of layouts without them)",
                  "all-linear": "every Linear layer of the decoder (not lm_head)"}
LISTING = "python -m engine train --help-config --set task_type=text-generation"


@dataclass
class TextConfig:
    # --- model ------------------------------------------------------------------------------------
    task_type: str = _f(TASK_TYPE, "text-generation: train a LoRA for a local causal language model.",
                        choices=(TASK_TYPE,), group="model")
    base_model: str = _f("", "Local transformers folder of a causal LM (config.json, tokenizer, *.safetensors): "
                         "Llama, Qwen2/3, Mistral, Gemma, GPT-2 class. Nothing is downloaded.", group="model",
                         aliases=("pretrained_model_name_or_path", "model_path", "model_name_or_path"), path="dir")
    trust_remote_code: bool = _f(False, "Allow a model folder's own Python code (auto_map in config.json) to run. "
                                 "Off: such models are refused with the files that would run.", group="model")
    load_in_8bit: bool = _f(False, "Load the frozen weights in 8 bit (bitsandbytes, CUDA).", group="model")
    load_in_4bit: bool = _f(False, "Load the frozen weights in 4-bit NF4 (bitsandbytes, CUDA; QLoRA).", group="model")
    device: str = _f("auto", "auto, cpu, cuda, cuda:1, mps.", group="model")
    fast_path: str = _f("auto", "auto: Llama, Mistral, Qwen2 and Qwen3 layouts train through the engine's lean "
                        "forward (transformers' math with fewer kernels and saved activations); off: transformers' "
                        "own forward. Both compute the loss without holding the full logits.",
                        choices=("auto", "off"), group="model")

    # --- data ---------------------------------------------------------------------------------------
    train_data: str = _f("", "A .txt/.jsonl/.json/.csv file or a folder of them. .txt: one sample a line, or "
                         "documents separated by blank lines (text_split); .jsonl/.json: `text`, `messages` "
                         "(chat), `prompt`+`completion` or `instruction`/`input`/`output`; .csv: a text column.",
                         group="data", aliases=("train_data_dir", "dataset", "data_path", "train_file",
                                                "dataset_dir"), path="any")
    eval_data: str = _f("", "Held-out file or folder for perplexity; default: eval_split of train_data.",
                        group="data", aliases=("validation_file", "eval_file"), path="any")
    eval_split: float = _f(0.05, "Held-out share of the samples (below 1) or a sample count; 0 = none.",
                           group="data", aliases=("val_size", "validation_split"), minimum=0)
    text_column: str = _f("text", "Column (.csv) or key (.jsonl) holding plain text.", group="data",
                          aliases=("dataset_text_field",))
    text_split: str = _f("auto", "How a .txt file becomes samples: line (one a line), paragraph (blank-line "
                         "separated), file (the whole file), auto (paragraph when blank lines separate blocks of which more "
                         "than half span several lines, else line).",
                         choices=("auto", "line", "paragraph", "file"), group="data")
    chat_template: str = _f("auto", "For chat samples: auto (the tokenizer's), chatml, a .jinja file or a "
                            "Jinja template. Loss is taken on the assistant turns only.", group="data")
    max_length: int = _f(1024, "Tokens per row: samples are packed into rows of this length.", group="data",
                         aliases=("cutoff_len", "max_seq_length", "block_size", "max_seq_len"), minimum=16)
    packing: bool = _f(True, "Pack whole samples into full rows (each attends only to itself); off: one "
                       "sample a row, padded.", group="data")
    long_samples: str = _f("truncate", "Samples longer than max_length: truncate (keep the start), split (text "
                           "in max_length pieces; chat is truncated), drop, or error.",
                           choices=("truncate", "split", "drop", "error"), group="data")

    # --- LoRA network ---------------------------------------------------------------------------------
    lora_rank: int = _f(8, "LoRA rank (r).", group="network", aliases=("network_dim", "rank", "lora_r"), minimum=1)
    lora_alpha: float = _f(16.0, "LoRA alpha; scale = alpha/rank.", group="network",
                           aliases=("network_alpha", "alpha"), minimum=0)
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.", group="network", aliases=("network_dropout",),
                             minimum=0)
    target_modules: Any = _f("attention", "attention (q_proj, v_proj), all-linear, or a list of module names "
                             "such as [q_proj, k_proj, v_proj, o_proj].", group="network", aliases=("lora_target",))
    network_weights: str = _f("", "Continue from an existing PEFT adapter folder.", group="network",
                              aliases=("init_lora", "adapter_name_or_path"), path="dir")

    # --- optimisation ---------------------------------------------------------------------------------
    batch_size: int = _f(1, "Rows per step.", aliases=("train_batch_size", "per_device_train_batch_size"), minimum=1)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients are summed per update.", minimum=1)
    epochs: int = _f(3, "Passes over the training rows.", aliases=("max_train_epochs", "num_train_epochs",
                                                                   "num_epochs"), minimum=1)
    max_train_steps: int = _f(0, "Optimizer updates; when > 0 it overrides epochs.", aliases=("max_steps",),
                              minimum=0)
    learning_rate: float = _f(2e-4, "LoRA learning rate.", aliases=("lr",), minimum=0)
    lr_scheduler: str = _f("cosine", "Learning-rate schedule.", choices=SCHEDULERS, aliases=("lr_scheduler_type",))
    warmup_steps: float = _f(0.03, "Warm-up: a step count, or a ratio of the run when below 1.",
                             aliases=("lr_warmup_steps", "warmup_ratio"), minimum=0)
    lr_scheduler_num_cycles: int = _f(1, "Restarts for cosine_with_restarts.", minimum=1)
    lr_scheduler_power: float = _f(1.0, "Power for the polynomial schedule.", minimum=0)
    optimizer: str = _f("AdamW", "AdamW, AdamW8bit (bitsandbytes, CUDA), Lion, Adafactor, Prodigy.",
                        choices=OPTIMIZERS, aliases=("optimizer_type", "optim"))
    optimizer_args: dict = _f({}, "Extra optimizer keyword arguments, e.g. {betas: [0.9, 0.99]}.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.", minimum=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns it off.", minimum=0)
    mixed_precision: str = _f("auto", "Dtype the frozen weights are loaded and computed in: auto (bf16 where the "
                              "GPU has it, else fp16; fp32 on CPU), no (fp32), fp16, bf16. LoRA weights stay fp32.",
                              choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer in the backward pass: about a third "
                                      "slower, far less memory.")
    cuda_graph: bool = _f(True, "Replay the whole training step as one CUDA graph when the config allows it "
                          "(bf16/fp32, fused AdamW, no gradient accumulation, packed rows).")
    torch_compile: bool = _f(False, "Compile each decoder layer of the lean forward with torch.compile (inductor): "
                             "its RMSNorms, rotary, SwiGLU, dropout and residual adds fuse, forward and backward. "
                             "Compiles at the first steps (a minute or two); CUDA only (elsewhere, or for a layer "
                             "it cannot compile, the run trains without it, logged).")
    seed: int = _f(42, "Random seed (LoRA init, held-out split, row order, dropout).", minimum=0)

    # --- output -------------------------------------------------------------------------------------
    output_dir: str = _f("output", "Where `<output_name>/` is written.", group="save")
    output_name: str = _f("my_lora", "Name of the adapter folder.", group="save")
    save_precision: str = _f("fp32", "Dtype of the saved adapter weights.", choices=("fp16", "bf16", "fp32"),
                             group="save")
    save_steps: int = _f(0, "Write a checkpoint every N steps (0 = off).", group="save",
                         aliases=("save_every_n_steps", "checkpointing_steps"), minimum=0)
    save_every_n_epochs: int = _f(1, "Write a checkpoint every N epochs (0 = off).", group="save", minimum=0)
    save_last_n_checkpoints: int = _f(3, "Older checkpoints are deleted (0 keeps all).", group="save", minimum=0)
    resume_from_checkpoint: str = _f("", "'latest' or a checkpoint folder to continue from exactly.",
                                     group="save", aliases=("resume",))
    log_with: str = _f("", "tensorboard to log loss, lr and perplexity.", choices=("", "tensorboard"), group="save")
    training_comment: str = _f("", "Stored in the adapter's metadata.", group="save")
    merge: bool = _f(False, "Also write the merged model (base + LoRA) to <output_name>/merged (--merge).",
                     group="save")

    # --- samples ------------------------------------------------------------------------------------
    sample_prompts: Any = _f([], "Prompts to complete at the end, with and without the LoRA: a list or a .txt "
                             "file (one a line). Chat-trained runs wrap them in the chat template.", group="sample")
    sample_max_new_tokens: int = _f(64, "Tokens generated per prompt.", group="sample", minimum=1)
    sample_temperature: float = _f(0.0, "0 = greedy; above 0 samples with this temperature.", group="sample",
                                   minimum=0)
    sample_seed: int = _f(1234, "Seed for sampled generations.", group="sample")

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TextConfig":
        """Build from a (possibly grouped, possibly aliased) mapping, validating every key and value."""
        values, image_only = {}, []
        for key, value in flatten_groups(data, source).items():
            if key not in _FIELDS and key not in _ALIASES and _is_image_key(key):
                image_only.append(key)
                continue
            name = canonical_key(key, source, _FIELDS, _ALIASES, LISTING)
            values[name] = coerce_value(name, value, source, _META[name], _TYPES[name])
        if image_only:
            raise ConfigError(f"{source}: {', '.join(image_only)} {'is' if len(image_only) == 1 else 'are'} for image "
                              f"LoRAs and mean nothing with task_type: text-generation. Remove "
                              f"{'it' if len(image_only) == 1 else 'them'} ({LISTING} lists the text keys).")
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def with_overrides(self, assignments: list[str]) -> "TextConfig":
        """Apply `--set key=value` overrides (values parsed as YAML: 1e-4, true, [a, b])."""
        import yaml

        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r} (for example --set lora_rank=16)")
            key, raw = item.split("=", 1)
            data[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        return TextConfig.from_dict(data, source="--set")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self, source: str = "config") -> None:
        if self.lora_dropout >= 1:
            raise ConfigError(f"{source}: lora_dropout is a probability below 1, got {self.lora_dropout}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{source}: lora_alpha must be above 0 (scale = alpha/rank), got {self.lora_alpha}.")
        for key in ("warmup_steps", "eval_split"):
            value = getattr(self, key)
            if value >= 1 and value != int(value):
                raise ConfigError(f"{source}: {key} is a count (e.g. 100) or a ratio below 1 (e.g. 0.05), "
                                  f"not {value}.")
        if isinstance(self.target_modules, str):
            preset = self.target_modules.strip().lower().replace("_", "-")
            if preset not in TARGET_PRESETS:
                raise ConfigError(f"{source}: target_modules must be attention, all-linear or a list of module "
                                  f"names such as [q_proj, v_proj]; got {self.target_modules!r}.")
            self.target_modules = preset
        elif not self.target_modules:
            raise ConfigError(f"{source}: target_modules is an empty list; name at least one module (q_proj).")
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError(f"{source}: load_in_8bit and load_in_4bit are both on; choose one.")
        if any(c in self.output_name for c in '/\\:*?"<>|') or self.output_name in ("", ".", ".."):
            raise ConfigError(f"{source}: output_name {self.output_name!r} must be a plain folder name "
                              f"(no / \\ : * ? \" < > |).")

    def check_paths(self) -> None:
        """Say which key points at a path that does not exist (before anything is loaded)."""
        for key, required in (("base_model", True), ("train_data", True), ("eval_data", False),
                              ("network_weights", False)):
            value = getattr(self, key)
            if not value:
                if required:
                    what = "a local transformers model folder" if key == "base_model" else "your text file or folder"
                    raise ConfigError(f"{key} is not set: it must point to {what}.")
                continue
            p = Path(value).expanduser()
            if not p.exists():
                raise ConfigError(missing_path(key, value))
            if _META[key]["path"] == "dir" and not p.is_dir():
                raise ConfigError(f"{key} must be a folder, but '{value}' is a file.")


_FIELDS = {f.name: f for f in dataclasses.fields(TextConfig)}
_META = {name: f.metadata for name, f in _FIELDS.items()}
_ALIASES = {alias: name for name, meta in _META.items() for alias in meta["aliases"]}
_TYPES = typing.get_type_hints(TextConfig)
_IMAGE_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} | {
    alias for f in dataclasses.fields(TrainConfig) for alias in f.metadata["aliases"]}


def _is_image_key(key: str) -> bool:
    return key in _IMAGE_KEYS


def is_text_task(value: Any) -> bool:
    return str(value).strip().lower() == TASK_TYPE


def load_text_config(path: str | Path | None, overrides: list[str] | None = None) -> TextConfig:
    """Read a YAML (or TOML/JSON) config whose task_type is text-generation, apply `--set`, validate."""
    cfg = TextConfig.from_dict(read_config_file(path), source=Path(path).name) if path else TextConfig()
    return cfg.with_overrides(overrides) if overrides else cfg

