"""Command line: `python -m engine train|demo|caption|check|inspect`.

Errors a user can fix are printed as one line (no traceback) with exit code 2; Ctrl-C during training
keeps a checkpoint and prints how to resume (exit code 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .errors import TrainingStopped, UserError


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine train", description="Train a LoRA from a YAML config.")
    p.add_argument("--config", help="YAML (or TOML) config file; see configs/ for commented examples")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set base_model=/models/v1-5.safetensors (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    return p


def train_main(argv: list[str]) -> int:
    from .config import TrainConfig, describe_fields, load_config
    from .progress import train_in_console
    from .train import train

    args = _train_parser().parse_args(argv)
    if args.help_config:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, args.overrides) if args.config else TrainConfig().with_overrides(args.overrides)
    cfg, command = _fresh_output_name(cfg, argv)
    result = train_in_console(lambda callbacks: train(cfg, callbacks=callbacks), command)
    if result is None:
        return 130
    print(f"LoRA written to {result.lora_path}\nUse it as <lora:{cfg.output_name}:0.8> after copying it into "
          f"your models/loras (ComfyUI) or models/Lora (A1111) folder.")
    return 0


def _fresh_output_name(cfg, argv: list[str]):
    """A new run never replaces an earlier run's LoRA: `name_2`, `name_3`... unless `overwrite` is set
    or the run resumes (then the same folder is meant). Returns the config and the command to resume it."""
    from .lora.output_names import unused_run_name

    command = " ".join(argv)
    if cfg.overwrite or cfg.resume_from_checkpoint:
        return cfg, command
    name = unused_run_name(cfg.output_dir, cfg.output_name)
    if name == cfg.output_name:
        return cfg, command
    print(f"{Path(cfg.output_dir) / cfg.output_name} holds the LoRA of an earlier run, so this run is written as "
          f"'{name}' (set overwrite: true to replace it, or resume_from_checkpoint: latest to continue it).")
    return cfg.replace(output_name=name), f"{command} --set output_name={name}"


# Packages `python -m engine` imports, with the name pip installs them under.
_PACKAGES = {"torch": "torch (from https://pytorch.org, the build for your CUDA)", "diffusers": "diffusers",
             "transformers": "transformers", "safetensors": "safetensors", "accelerate": "accelerate",
             "kornia": "kornia", "yaml": "pyyaml", "PIL": "pillow", "tqdm": "tqdm", "numpy": "numpy",
             "onnxruntime": "onnxruntime", "prodigyopt": "prodigyopt", "tensorboard": "tensorboard"}


def _missing_package(exc: ModuleNotFoundError, command: str) -> str | None:
    """One line naming the package to install, for a module this program needs; None for anything else."""
    top = (exc.name or "").split(".")[0]
    if top not in _PACKAGES:
        return None
    return (f"python -m engine {command} needs the package {_PACKAGES[top]}, which this Python "
            f"({sys.executable}) does not have. Install the requirements: pip install -r requirements.txt "
            f"(install torch first, from https://pytorch.org).")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    def lazy(module: str, function: str):
        return lambda a: getattr(importlib.import_module(module, __package__), function)(a)

    commands = {
        "train": train_main,
        "demo": lazy(".demo", "demo_main"),
        "caption": lazy(".caption.cli", "caption_main"),
        "check": lazy(".check", "check_main"),
        "inspect": lazy(".inspect_cli", "inspect_main"),
    }
    if not argv or argv[0] not in commands:
        print("usage: python -m engine {train,demo,caption,check,inspect} ...\n"
              "  train    train a LoRA from a YAML config (--config x.yaml --set key=value); with task_type:\n"
              "           text-generation, a PEFT LoRA for a local language model\n"
              "  demo     train on the built-in demo data and model, in about a minute on a CPU\n"
              "  caption  write captions for a folder of images (WD14 tagger, BLIP-style model, template)\n"
              "  check    report problems in a dataset folder before training\n"
              "  inspect  show what a LoRA file or checkpoint contains")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        from .text.cli import text_command  # a config with task_type: text-generation trains a language model

        return (text_command(argv) or commands[argv[0]])(argv[1:])
    except TrainingStopped as exc:
        print(f"stopped: {exc}" + (f" (checkpoint: {exc.checkpoint})" if exc.checkpoint else ""))
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = _missing_package(exc, argv[0])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
