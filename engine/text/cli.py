"""The text mode's command line: `python -m engine train|check` when the config says
`task_type: text-generation` (or `--set task_type=text-generation`), and `python -m engine.text.cli merge`.

`text_command(argv)` is what engine/__main__.py asks first: it reads only the config's task_type (a
file it cannot read is left to the image path, whose error message is the same) and returns the text
entry point, or None for an image run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import describe_fields, flatten_groups, read_config_file
from ..errors import ConfigError, UserError
from .config import TextConfig, is_text_task, load_text_config


def task_type_of(argv: list[str]):
    """The task_type a command line asks for: a --set beats the config file; None when neither says."""
    from_file = from_set = None
    i = 0
    while i < len(argv):
        key, eq, inline = argv[i].partition("=")
        if key in ("--config", "--set"):
            item = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if eq else 1
            if key == "--config":
                try:
                    from_file = flatten_groups(read_config_file(item), Path(item).name).get("task_type")
                except (ConfigError, OSError):
                    pass  # the image path reads it again and says what is wrong
            elif item.split("=", 1)[0].strip() == "task_type":
                from_set = item.split("=", 1)[1] if "=" in item else ""
        i += 1
    return from_set if from_set is not None else from_file


def text_command(argv: list[str]):
    """The text entry point for `train` / `check` when the run is a text one, else None."""
    if len(argv) < 1 or argv[0] not in ("train", "check") or not is_text_task(task_type_of(argv[1:])):
        return None
    return text_train_main if argv[0] == "train" else text_check_main


def _config(args) -> TextConfig:
    return load_text_config(args.config, args.overrides)


def text_train_main(argv: list[str]) -> int:
    from ..progress import train_in_console
    from .train import train_text

    p = argparse.ArgumentParser(prog="python -m engine train", description="Train a LoRA for a local language "
                                "model (task_type: text-generation).")
    p.add_argument("--config", help="YAML (or TOML) config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--merge", action="store_true", help="also write the merged model to <output>/merged")
    p.add_argument("--help-config", action="store_true", help="list every text key with its default")
    args = p.parse_args(argv)
    if args.help_config:
        print(describe_fields(TextConfig))
        return 0
    cfg = _config(args)
    if args.merge:
        cfg.merge = True
    result = train_in_console(lambda callbacks: train_text(cfg, callbacks=callbacks), " ".join(argv))
    if result is None:
        return 130
    before, after = result.evaluation.get("before"), result.evaluation.get("after")
    if before and after:
        print(f"held-out perplexity: {before['perplexity']:.3f} before, {after['perplexity']:.3f} after")
    print(f"adapter written to {result.adapter_dir}\nLoad it with PeftModel.from_pretrained(model, "
          f"'{result.adapter_dir}') or model.load_adapter('{result.adapter_dir}')."
          + (f"\nmerged model: {result.merged_dir}" if result.merged_dir else ""))
    return 0


def text_check_main(argv: list[str]) -> int:
    import json

    from .check import check_text

    p = argparse.ArgumentParser(prog="python -m engine check", description="Report what a text run will make of "
                                "its data: tokens, samples past max_length, packing, steps.")
    p.add_argument("data", nargs="?", help="text file or folder; default: the config's train_data")
    p.add_argument("--config", help="training config (YAML/TOML) with task_type: text-generation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when there are warnings")
    args = p.parse_args(argv)
    try:
        cfg = _config(args)
        if args.data:
            cfg = cfg.with_overrides([f"train_data={args.data}"])
        report = check_text(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.to_text())
    return 1 if args.strict and report.data.warnings else 0


def merge_main(argv: list[str]) -> int:
    """`python -m engine.text.cli merge ADAPTER [--base MODEL] [--out DIR]`: base + adapter as one model."""
    from .save import merge_adapter

    p = argparse.ArgumentParser(prog="python -m engine.text.cli merge", description="Write base model + "
                                "adapter as one transformers folder.")
    p.add_argument("adapter", help="the adapter folder a text run wrote")
    p.add_argument("--base", help="the base model folder (default: the one recorded in adapter_config.json)")
    p.add_argument("--out", help="output folder (default: <adapter>/merged)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        out = merge_adapter(Path(args.adapter), Path(args.out or Path(args.adapter) / "merged"), base=args.base,
                            device=args.device, trust_remote_code=args.trust_remote_code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["merge"]:
        sys.exit(merge_main(sys.argv[2:]))
    print("usage: python -m engine.text.cli merge ADAPTER [--base MODEL] [--out DIR]")
    sys.exit(2)
