"""`python -m engine inspect FILE`: what a LoRA file, a checkpoint folder or a base model is.

A base model (single file or diffusers folder) is judged by the same detection a training run uses
(engine/models/detect.py), so "usable as base_model" here means a run would accept it; anything a run
would refuse gets that refusal as one line (exit status 2) instead.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .errors import UserError

_SHOWN = ("ss_output_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_steps",
          "ss_epoch", "ss_learning_rate", "ss_num_train_images", "ss_sd_model_name", "sshs_model_hash",
          "modelspec.architecture", "modelspec.trigger_phrase")


def describe_lora(path: Path) -> str:
    from .lora.kohya_io import file_ranks, read_lora

    tensors, metadata = read_lora(path)
    ranks = file_ranks(tensors)
    parts = Counter(key.split("_")[1] if key.startswith("lora_") else key.split(".")[0] for key in ranks)
    lines = [f"{path.name}: {len(ranks)} LoRA modules ({', '.join(f'{k}: {n}' for k, n in sorted(parts.items()))}), "
             f"rank {sorted(set(ranks.values()))}"]
    lines += [f"  {k} = {metadata[k]}" for k in _SHOWN if k in metadata]
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine inspect",
                                     description="Show what a LoRA file, checkpoint folder or base model is.")
    parser.add_argument("path")
    args = parser.parse_args(argv)
    path = Path(args.path).expanduser()
    if not path.exists():
        raise UserError(f"'{path}' does not exist.")
    from .checkpoint import read_state, state_file

    if path.is_dir() and state_file(path) is not None:
        state = read_state(path)
        print(f"checkpoint at step {state['step']} (next micro-batch {state['micro']}), LoRA {state['lora_file']}")
        print(f"  run settings: {state['fingerprint']}")
        return 0
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
        except Exception as exc:
            raise UserError(f"'{path.name}' is not a readable .safetensors file ({exc}).") from None
        if any(".lora_" in k or k.endswith(".alpha") for k in keys):
            print(describe_lora(path))
            return 0
    print(describe_model(path))
    return 0


def describe_model(path: Path) -> str:
    """What a base model file or folder is, as far as its names, shapes and configs tell (nothing is
    loaded); a ModelError (a UserError: one line) for anything a training run would refuse."""
    from .models.demo_model import is_demo_model_file
    from .families import get_family
    from .models.detect import detect_path

    if is_demo_model_file(path):
        return (f"{path.name}: the built-in demo model (a tiny SD1-structured model, 64x64 px, v-prediction with "
                f"zero terminal SNR; python -m engine demo). Usable as base_model.")
    det = detect_path(path)
    size = "standard sizes" if det.standard else "non-standard sizes (a test model or an unusual variant)"
    prediction = ("v-prediction (the file has a v_pred key)" if det.v_pred_marker else
                  f"{det.scheduler_prediction_type} (its scheduler config)" if det.scheduler_prediction_type else
                  "epsilon unless the weights say v-prediction (checked when loaded; prediction_type overrides)")
    notes = ["zero-terminal-SNR schedule (ztsnr key)"] if det.ztsnr else []
    if det.layout == "ldm" and not det.standard:
        notes.append("a single file of non-standard sizes cannot be built offline: use a diffusers folder of it")
    lines = [f"{path.name}: {det.description} ({get_family(det.family).display_name}, {size})", f"  prediction: {prediction}"]
    lines += [f"  {n}" for n in notes]
    usable = det.layout == "diffusers" or det.standard
    lines.append("  usable as base_model" if usable else "  not usable as base_model as it is")
    return "\n".join(lines)
