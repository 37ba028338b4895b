"""The PEFT adapter folder a text run leaves, and the merged model.

The folder is what `PeftModel.from_pretrained(model, folder)` and transformers' `model.load_adapter(folder)`
read: `adapter_config.json` and `adapter_model.safetensors` (PEFT writes both), plus the tokenizer
files when the run changed the tokenizer (a chat template set by the config). The safetensors header
also carries the run's settings and results as strings (`training_config` is the resolved YAML), so
they travel with the weights; loaders ignore keys they do not know. Files are written to a temporary
folder first and moved into place one by one, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHTS = "adapter_model.safetensors"
PRODUCT = "inplace-lora-trainer"


def adapter_metadata(cfg, config_yaml: str, *, steps: int, extra: dict | None = None) -> dict[str, str]:
    md = {"format": "pt", "task_type": "text-generation", "trainer": PRODUCT, "training_config": config_yaml,
          "base_model": str(cfg.base_model), "steps": str(steps), "lora_rank": str(cfg.lora_rank),
          "lora_alpha": str(cfg.lora_alpha), "learning_rate": str(cfg.learning_rate),
          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "training_comment": cfg.training_comment}
    for key, value in (extra or {}).items():
        md[key] = value if isinstance(value, str) else json.dumps(value)
    return md


def save_adapter(peft_model, folder: Path, *, precision: str, metadata: dict[str, str], tokenizer=None) -> Path:
    """Write the adapter into `folder` (created if needed; other files there are left alone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    weights = load_file(str(tmp / WEIGHTS))
    dtype = SAVE_DTYPES[precision]
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS), metadata=metadata)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return folder


def merge_adapter(adapter: Path, out: Path, *, base: str | None = None, device: str = "cpu",
                  trust_remote_code: bool = False) -> Path:
    """Base model + adapter folded into plain weights, saved as a transformers folder at `out` (with the
    adapter's tokenizer when it has one, else the base model's). The base is loaded in its own dtype."""
    from transformers import AutoModelForCausalLM

    from .model import check_adapter_folder, check_model_folder, load_tokenizer, offline, require_peft

    peft = require_peft()
    adapter = check_adapter_folder(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = base or config.get("base_model_name_or_path") or ""
    check_model_folder(base, trust_remote_code)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True,
                                                     trust_remote_code=trust_remote_code).to(device)
        merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = Path(out).with_name(Path(out).name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    load_tokenizer(adapter if has_tokenizer else base, trust_remote_code).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return Path(out)
