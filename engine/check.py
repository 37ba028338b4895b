"""`python -m engine check DIR`: what a training run will make of a dataset, before it runs.

Most failed LoRAs are dataset problems found after an hour of training: a duplicate that is learned
twice as hard, thumbnails upscaled into blur, captions missing or cut at CLIP's 75-token window, a
folder of 12 images set to 1 repeat. The check builds the dataset exactly as training does
(engine/data's TrainData: same images, captions, buckets and batches) and reports on it, with the
steps the run will make and the rule of thumb the community uses for that many images.
The ComfyUI LoadDataset node and the A1111 tab show the same report (`check_dataset(cfg).to_text()`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import TrainConfig, load_config
from .data.cache import file_digest
from .data.captions import CaptionEncodingError, sidecar_caption
from .data.images import list_image_paths, load_image, scan_images
from .data.records import CLIP_TOKEN_LIMIT, estimate_tokens
from .data.text import fixed_caption
from .data.train_data import TrainData
from .errors import DatasetError, UserError

# Community rule of thumb for character/style LoRAs at batch 1 (kohya / lora-scripts guides), which
# lands most datasets at roughly 1,500-3,000 image views: (up to N images, repeats, epochs, rank).
GUIDANCE = [(19, (10, 20), (10, 15), (8, 8)), (49, (3, 6), (10, 15), (8, 16)), (100, (1, 2), (15, 20), (8, 16)),
            (300, (1, 1), (10, 15), (16, 32)), (math.inf, (1, 1), (5, 10), (16, 32))]


def _rng(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}-{pair[1]}"


def _guidance(n_images: int):
    return next(row for row in GUIDANCE if n_images <= row[0])


def recommendation(n_images: int) -> str:
    """The usual repeats/epochs/rank for a dataset of `n_images` (a rule of thumb, not a measurement)."""
    _, repeats, epochs, rank = _guidance(n_images)
    text = (f"for {n_images} images the usual advice is {_rng(repeats)} repeats x {_rng(epochs)} epochs at rank "
            f"{_rng(rank)}, batch 1 (a community rule of thumb)")
    return text + ("; fewer than 20 images rarely generalise, add more if you can" if n_images < 20 else "")


def views_verdict(n_images: int, views: int) -> str:
    """How a plan's image views compare with what the rule of thumb gives for this many images."""
    _, repeats, epochs, _ = _guidance(max(n_images, 1))
    low, high = n_images * repeats[0] * epochs[0], n_images * repeats[1] * epochs[1]
    if views < low / 1.5:
        return "fewer than usual: raise repeats or epochs"
    if views > high * 1.5:
        return "more than usual: watch the previews for overfitting"
    return "in the usual range"


def count_tokens(captions: list[str]) -> tuple[list[int], str]:
    """CLIP token counts (without start/end tokens), and which counter was used."""
    try:
        from .models.clip_tokenizer import clip_tokenizer

        ids = clip_tokenizer()(list(captions), add_special_tokens=False, verbose=False).input_ids
        return [len(i) for i in ids], "CLIP tokenizer"
    except Exception:  # tokenizer data or transformers missing: a word/punctuation estimate still warns
        return [estimate_tokens(c) for c in captions], "approximate count (CLIP tokenizer unavailable)"


_DCT = np.array([[math.cos(math.pi * (2 * n + 1) * k / 64) * (math.sqrt(1 / 32) if k == 0 else math.sqrt(2 / 32))
                  for n in range(32)] for k in range(32)])


def perceptual_hash(image) -> int:
    """64-bit pHash: low 8x8 DCT frequencies of a 32x32 grey thumbnail against their median."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def _groups(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    members = defaultdict(list)
    for a, b in pairs:
        members[find(a)] += [a, b]
    return [sorted(set(m)) for m in members.values()]


@dataclass
class DatasetReport:
    folder: Path
    resolution: tuple[int, int]
    subsets: list[tuple[str, int, int]]  # (folder name, images, repeats)
    sizes: list[tuple[int, int]]
    buckets: dict[tuple[int, int], int]
    steps: dict[str, int]
    recommendation: str
    token_counter: str
    token_limit: int = CLIP_TOKEN_LIMIT
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    too_small: list[tuple[Path, int, int]] = field(default_factory=list)  # below the training resolution
    exact_duplicates: list[list[Path]] = field(default_factory=list)
    near_duplicates: list[list[Path]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    folder_captions: list[Path] = field(default_factory=list)  # only the kohya folder name as caption
    long_captions: list[tuple[Path, int]] = field(default_factory=list)
    max_tokens: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plan_source: str = ""  # whose steps/epochs/batch size the plan uses, when not the config's own

    @property
    def image_count(self) -> int:
        return len(self.sizes)

    def _rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.folder).as_posix()
        except ValueError:
            return str(p)

    def _list(self, paths, limit=8) -> str:
        names = [self._rel(p) for p in paths]
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

    def problems(self) -> list[str]:
        """One line per problem, worst first; empty when the dataset looks ready."""
        out = []
        if self.unreadable:
            out.append(f"{len(self.unreadable)} image(s) that training skips: " + "; ".join(
                f"{self._rel(p)} ({why})" for p, why in self.unreadable[:8]))
        if self.exact_duplicates:
            out.append(f"{len(self.exact_duplicates)} set(s) of identical files (each copy is learned again; "
                       f"delete all but one): " + "; ".join(" = ".join(map(self._rel, g)) for g in self.exact_duplicates))
        if self.near_duplicates:
            out.append(f"{len(self.near_duplicates)} set(s) of near-duplicate images (same picture resized or "
                       f"re-encoded?): " + "; ".join(" ~ ".join(map(self._rel, g)) for g in self.near_duplicates))
        if self.missing_captions:
            out.append(f"{len(self.missing_captions)} image(s) without a caption: {self._list(self.missing_captions)}"
                       f" (python -m engine caption DIR writes them)")
        if self.empty_captions:
            out.append(f"{len(self.empty_captions)} empty caption file(s): {self._list(self.empty_captions)}")
        if self.long_captions:
            out.append(f"{len(self.long_captions)} caption(s) longer than the {self.token_limit}-token window "
                       f"(the rest is cut off): " + ", ".join(f"{self._rel(p)} ({n})" for p, n in self.long_captions[:8]))
        if self.too_small:
            w, h = self.resolution
            out.append(f"{len(self.too_small)} image(s) smaller than the training resolution {w}x{h} (upscaled, so "
                       f"blurrier): " + ", ".join(f"{self._rel(p)} ({a}x{b})" for p, a, b in self.too_small[:8]))
        return out + self.warnings

    def to_text(self) -> str:
        w, h = self.resolution
        lines = [f"Dataset: {self.folder} - {self.image_count} usable image(s)"]
        lines += [f"  {name}: {n} image(s) x {r} repeat(s)" for name, n, r in self.subsets]
        if self.sizes:
            areas = sorted(self.sizes, key=lambda s: s[0] * s[1])
            med = areas[len(areas) // 2]
            lines.append(f"Sizes: smallest {areas[0][0]}x{areas[0][1]}, median {med[0]}x{med[1]}, "
                         f"largest {areas[-1][0]}x{areas[-1][1]}")
        lines.append(f"Buckets at {w}x{h}: " + ", ".join(f"{bw}x{bh} ({n})" for (bw, bh), n in
                                                        sorted(self.buckets.items(), key=lambda kv: -kv[1])))
        by_folder = f", {len(self.folder_captions)} only the folder name" if self.folder_captions else ""
        lines.append(f"Captions: longest {self.max_tokens} tokens of {self.token_limit} ({self.token_counter})"
                     f"{by_folder}")
        s = self.steps
        lines.append(f"Plan: {s['samples_per_epoch']} samples per epoch -> {s['batches_per_epoch']} batches of "
                     f"{s['batch_size']} -> {s['steps_per_epoch']} steps per epoch x {s['epochs']} epochs = "
                     f"{s['total_steps']} steps ({s['image_views']:,} image views)"
                     + (f", with {self.plan_source}" if self.plan_source else ""))
        views = s["image_views"]
        lines.append(f"Recommendation: {self.recommendation}. This plan's {views:,} image views are "
                     f"{views_verdict(self.image_count, views)}.")
        problems = self.problems()
        lines.append(f"Problems ({len(problems)}):" if problems else "No problems found.")
        lines += [f"  - {p}" for p in problems]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        rel = self._rel
        return {"folder": str(self.folder), "images": self.image_count, "resolution": list(self.resolution),
                "subsets": [{"name": n, "images": i, "repeats": r} for n, i, r in self.subsets],
                "buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.items()}, "steps": self.steps,
                "recommendation": self.recommendation, "token_counter": self.token_counter,
                "max_tokens": self.max_tokens, "unreadable": [[rel(p), r] for p, r in self.unreadable],
                "too_small": [[rel(p), a, b] for p, a, b in self.too_small],
                "exact_duplicates": [[rel(p) for p in g] for g in self.exact_duplicates],
                "near_duplicates": [[rel(p) for p in g] for g in self.near_duplicates],
                "missing_captions": [rel(p) for p in self.missing_captions],
                "empty_captions": [rel(p) for p in self.empty_captions],
                "long_captions": [[rel(p), n] for p, n in self.long_captions],
                "tag_frequency": self.tag_frequency, "problems": self.problems()}


def check_dataset(cfg: TrainConfig, *, native_resolution: int = 512, near_distance: int = 6) -> DatasetReport:
    """Report on `cfg.train_data_dir` as a run with `cfg` would use it (raises DatasetError if unusable)."""
    data = TrainData(cfg, native_resolution=native_resolution, model_key="check", train_text_encoder=False)
    root = Path(cfg.train_data_dir).expanduser()
    records = [r for r in data.records if not r.is_reg]
    paths = [r.path for r in records]
    bpe = data.batches_per_epoch()
    accum = cfg.gradient_accumulation_steps
    total = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * bpe / accum))
    samples = data.num_train_images + data.num_reg_images
    steps = {"samples_per_epoch": samples, "batch_size": cfg.batch_size, "batches_per_epoch": bpe,
             "steps_per_epoch": math.ceil(bpe / accum), "epochs": cfg.epochs if not cfg.max_train_steps
             else math.ceil(total * accum / max(bpe, 1)), "total_steps": total,
             "image_views": total * accum * cfg.batch_size}
    summary = data.summary()
    buckets = dict(Counter(data.placements[i].bucket for i, r in enumerate(data.records) if not r.is_reg))
    captions = [fixed_caption(r.caption, trigger_word=cfg.trigger_word) for r in records]
    tokens, counter = count_tokens(captions)
    report = DatasetReport(root, data.resolution, [(s.name, len(s.records), s.repeats) for s in data.subsets
                                                   if not s.is_reg],
                           [(r.width, r.height) for r in records], buckets, steps, recommendation(len(records)),
                           counter, max_tokens=max(tokens, default=0), tag_frequency=summary["tag_frequency"])
    report.long_captions = [(p, n) for p, n in zip(paths, tokens) if n > CLIP_TOKEN_LIMIT]
    area = data.resolution[0] * data.resolution[1]
    report.too_small = [(r.path, r.width, r.height) for r in records if r.width * r.height < area]
    for r in records:
        if r.caption_source in ("none", "folder"):
            try:
                found = sidecar_caption(r.path, cfg.caption_extension)
            except CaptionEncodingError:
                continue  # named in the scan's encoding warning
            (report.empty_captions if found is not None else
             report.folder_captions if r.caption_source == "folder" else report.missing_captions).append(r.path)
    report.unreadable = _unreadable(data, set(paths), cfg.min_image_size)
    report.exact_duplicates, report.near_duplicates = _duplicates(paths, near_distance)
    reported_above = ("Skipped ", "have no caption", "will be truncated")  # listed in detail by this report
    report.warnings = [w for w in data.warnings if not any(k in w for k in reported_above)]
    return report


def _unreadable(data: TrainData, used: set[Path], min_size: int) -> list[tuple[Path, str]]:
    """Images in the dataset folders that training skips (damaged, or below min_image_size), with the reason."""
    unused = [p for s in data.subsets if not s.is_reg for p in list_image_paths(s.folder) if p not in used]
    return scan_images(unused, min_size=min_size)[1]


def colour_signature(image) -> np.ndarray:
    """A 4x4 RGB thumbnail in [0, 1]: pHash sees only grey levels, so two pictures of the same layout in
    other colours (a red and a blue version of one shape) hash alike; their signatures do not. A resized
    or re-encoded copy stays within a few levels of its original in every cell and channel."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((4, 4), Image.BOX), dtype=np.float32) / 255.0


def _duplicates(paths: list[Path], distance: int, colour_tolerance: float = 0.2
                ) -> tuple[list[list[Path]], list[list[Path]]]:
    digests = [file_digest(p) for p in paths]
    first: dict[str, int] = {}
    exact_pairs = [(first.setdefault(d, i), i) for i, d in enumerate(digests) if first.setdefault(d, i) != i]
    hashes, colours = [], []
    for p in paths:
        try:
            image = load_image(p)
        except DatasetError:
            hashes.append(None)
            colours.append(None)
            continue
        hashes.append(perceptual_hash(image))
        colours.append(colour_signature(image))
    near_pairs = [(i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))
                  if digests[i] != digests[j] and hashes[i] is not None and hashes[j] is not None
                  and (hashes[i] ^ hashes[j]).bit_count() <= distance
                  and float(np.abs(colours[i] - colours[j]).max()) <= colour_tolerance]
    as_paths = lambda groups: [[paths[i] for i in g] for g in groups]  # noqa: E731
    return as_paths(_groups(exact_pairs, len(paths))), as_paths(_groups(near_pairs, len(paths)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine check", description="Report problems in a dataset folder "
                                "before training: sizes, buckets, duplicates, captions, steps.")
    p.add_argument("folder", nargs="?", help="dataset folder (flat, or kohya N_name subfolders); default: the "
                   "config's train_data_dir")
    p.add_argument("--config", help="training config (YAML/TOML) whose settings the check uses")
    p.add_argument("--resolution", help="training resolution, e.g. 512, 1024 or 768,512 (default: the config's; "
                   "auto = 512, use 1024 for SDXL)")
    p.add_argument("--repeats", type=int, help="repeats for a flat folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--trigger", help="trigger word put first in every caption")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, e.g. --set caption_extension=.caption")
    p.add_argument("--near-distance", type=int, default=6, help="pHash bits (of 64) within which images count "
                   "as near duplicates")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when problems are found")
    return p


def check_main(argv: list[str]) -> int:
    """Entry point for `python -m engine check`; returns the exit status."""
    import json

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else TrainConfig()
        changes = {k: v for k, v in (("train_data_dir", args.folder), ("resolution", args.resolution),
                                     ("repeats", args.repeats), ("epochs", args.epochs),
                                     ("batch_size", args.batch_size), ("trigger_word", args.trigger)) if v is not None}
        cfg = cfg.replace(**changes).with_overrides(args.overrides) if args.overrides else cfg.replace(**changes)
        if not cfg.train_data_dir:
            raise UserError("give the dataset folder: python -m engine check DIR (or --config with train_data_dir).")
        report = check_dataset(cfg, near_distance=args.near_distance)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.to_text())
    return 1 if args.strict and report.problems() else 0
