"""`python -m engine caption DIR`: tag or caption a dataset folder from the command line.

The equivalent of lora-scripts' `tools/auto_label.py --input DIR --output metadata.csv` (both spellings
work), with any captioner the engine supports: a WD14 ONNX tagger, a transformers image-to-text
folder, or a template. Models are found by name in `--models-dir` folders (by default the `models/`
folder of the ComfyUI or A1111 install this repository sits in, and ./models) or given as a path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .discovery import A1111_SUBFOLDERS, COMFYUI_SUBFOLDERS, find_captioner_models, host_model_folders, load_captioner
from .run import CaptionOptions, caption_dataset
from .tags import MODES
from .template import DEFAULT_TEMPLATE
from .wd14 import TagOptions


def default_model_folders() -> list[Path]:
    """Captioner folders of the host install around this repository (custom_nodes/ or extensions/)."""
    repo = Path(__file__).resolve().parents[2]
    roots = [Path.cwd() / "models", repo.parent.parent / "models", repo / "models"]
    folders: list[Path] = []
    for root in roots:
        folders += [f for f in host_model_folders(root, COMFYUI_SUBFOLDERS + A1111_SUBFOLDERS) if f not in folders]
    return folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", nargs="?", help="dataset folder (flat, or kohya N_name subfolders)")
    p.add_argument("--input", dest="input_dir", help="same as FOLDER (lora-scripts spelling)")
    p.add_argument("--model", default="", help="captioner: a model name found in --models-dir, a path to a "
                   "WD14 .onnx / model folder / transformers folder, or 'template'. Default: the first "
                   "model found, else an error listing where it looked")
    p.add_argument("--models-dir", action="append", default=[], help="folder to search for models (repeatable)")
    p.add_argument("--list-models", action="store_true", help="list the models found and exit")
    p.add_argument("--output", default="txt", help="txt (sidecar files), csv, jsonl, or a file name such as "
                   "metadata.csv")
    p.add_argument("--mode", default="skip", choices=MODES, help="what to do with images that already have a "
                   "caption")
    p.add_argument("--trigger", default="", help="trigger word, put first in every new caption")
    p.add_argument("--dry-run", action="store_true", help="print the captions, write nothing")
    p.add_argument("--caption-extension", default=".txt", help="sidecar extension (.txt or .caption)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top", type=int, default=20, help="tags shown in the frequency summary")
    g = p.add_argument_group("WD14 taggers")
    g.add_argument("--threshold", type=float, default=0.35, help="general tag threshold")
    g.add_argument("--character-threshold", type=float, default=0.85)
    g.add_argument("--exclude", default="", help="comma-separated tags never written")
    g.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    g.add_argument("--no-escape", action="store_true", help="do not escape ( ) as \\( \\)")
    g.add_argument("--general-first", action="store_true", help="general tags before character tags")
    g.add_argument("--rating", default="none", choices=("none", "first", "last"), help="add the rating tag")
    g.add_argument("--max-tags", type=int, default=0, help="at most this many general tags (0 = all)")
    g = p.add_argument_group("transformers image-to-text models")
    g.add_argument("--prompt", default="", help="prompt or task, e.g. '<MORE_DETAILED_CAPTION>' (Florence-2)")
    g.add_argument("--max-length", type=int, default=75, help="maximum new tokens per caption")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--trust-remote-code", action="store_true", help="allow .py files shipped in the model folder")
    g = p.add_argument_group("template captioner")
    g.add_argument("--template", default=DEFAULT_TEMPLATE, help="fields: {trigger} {folder} {name} {stem}")
    return p


def _progress_bar():
    try:
        from tqdm import tqdm
    except ImportError:
        return None, None
    bar = None

    def update(done: int, total: int, path: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr)
        bar.n = done
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()
    return update, close


def caption_main(argv: list[str]) -> int:
    """Entry point for `python -m engine caption`; returns the exit status."""
    args = build_parser().parse_args(argv)
    folders = [Path(f) for f in args.models_dir] or default_model_folders()
    if args.list_models:
        models = find_captioner_models(folders)
        print("Looked in: " + (", ".join(map(str, folders)) or "nothing (pass --models-dir)"))
        for m in models:
            print(f"  {m.name:30} {m.kind:12} {m.path}")
        print(f"{len(models)} model(s); 'template' needs none.")
        return 0
    folder = args.folder or args.input_dir
    if not folder:
        print("error: give the dataset folder (python -m engine caption DIR)", file=sys.stderr)
        return 2
    update, close = _progress_bar()
    try:
        spec = args.model or _default_model(folders)
        tag_options = TagOptions(args.threshold, args.character_threshold, args.exclude,
                                 not args.keep_underscores, not args.no_escape, not args.general_first,
                                 args.rating, args.max_tags)
        captioner = load_captioner(spec, folders, device=args.device, batch_size=args.batch_size,
                                   tag_options=tag_options, prompt=args.prompt, max_length=args.max_length,
                                   num_beams=args.num_beams, trust_remote_code=args.trust_remote_code,
                                   template=args.template, trigger=args.trigger)
        print(f"Captioner: {captioner.name} ({captioner.kind})", file=sys.stderr)
        options = CaptionOptions(args.mode, args.trigger, args.output, args.caption_extension, args.dry_run)
        result = caption_dataset(folder, captioner, options, progress=update)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an option out of range (thresholds, rating)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nStopped; the captions made so far were saved.", file=sys.stderr)
        return 130
    finally:
        if close:
            close()
    if args.dry_run:
        for e in result.entries:
            print(f"{e.path.relative_to(result.folder).as_posix()}: {e.caption}")
    print(result.summary(args.top))
    return 1 if result.failed else 0


def _default_model(folders: list[Path]) -> str:
    models = find_captioner_models(folders)
    if models:
        print(f"No --model given; using {models[0].name} ({models[0].path}).", file=sys.stderr)
        return str(models[0].path)
    looked = ", ".join(map(str, folders)) or "no models folder was found around this install"
    raise UserError(f"no captioning model found (looked in: {looked}). Pass --model PATH to a WD14 tagger "
                    f"(model.onnx + selected_tags.csv) or a transformers caption model folder, --models-dir "
                    f"DIR, or --model template for captions from the trigger word and folder name.")
