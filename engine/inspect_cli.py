"""`python -m engine inspect FILE`: what a LoRA file, a checkpoint folder or a base model is."""

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
    from .models.detect import describe_checkpoint

    print(describe_checkpoint(path))
    return 0
