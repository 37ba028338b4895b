"""Caption a dataset folder: pick the images, run the captioner, merge, write, summarise.

This is the engine API the CLI (`python -m engine caption`), the ComfyUI AutoCaption node and the A1111
tab share. Images and existing captions are found exactly as training finds them (engine/data), so
"skip images that already have a caption" means what the trainer will see. Sidecars are written batch
by batch and a metadata file is written even when the run stops half way (Cancel, an error), so work
already done is never lost. `progress(done, total, path)` may raise to cancel.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..data.captions import find_metadata
from ..data.images import load_image
from ..data.records import scan_dataset
from ..data.text import tag_frequency
from ..errors import DatasetError, UserError
from .tags import MODES, clean_caption, format_frequency, insert_trigger, merge_caption
from .writers import write_metadata, write_sidecars

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class CaptionOptions:
    """What to do with the captions (the model's own options live on the captioner)."""

    mode: str = "skip"  # skip | overwrite | append | prepend
    trigger: str = ""  # put first in every new caption
    output: str = "txt"  # txt (sidecars) | csv | jsonl | a path ending in .csv / .jsonl
    caption_extension: str = ".txt"
    dry_run: bool = False  # caption and report, write nothing
    metadata_path: str = ""  # where existing captions are read from (default: found in the folder)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"caption mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension


@dataclass
class CaptionEntry:
    path: Path
    caption: str  # the caption after the run
    previous: str  # the caption before it ("" when none)
    status: str  # "captioned" | "kept" (skip mode) | "failed"
    generated: str = ""  # the captioner's output, cleaned
    error: str = ""  # why a failed image could not be captioned


@dataclass
class CaptionResult:
    folder: Path
    entries: list[CaptionEntry]
    written: list[Path]
    destination: str
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    completed: bool = True

    @property
    def failed(self) -> list[CaptionEntry]:
        return [e for e in self.entries if e.status == "failed"]

    @property
    def captions(self) -> dict[Path, str]:
        return {e.path: e.caption for e in self.entries if e.status != "failed"}

    def tag_counts(self) -> Counter:
        """Tag counts over every caption the dataset now has (as `ss_tag_frequency` will count them)."""
        return Counter(tag_frequency(list(self.captions.values())))

    def summary(self, top: int = 20) -> str:
        n = Counter(e.status for e in self.entries)
        verb = "would write" if self.dry_run else "wrote"
        kept = f", {n['kept']} already captioned and kept (mode overwrite/append redoes them)" if n["kept"] else ""
        failed = f", {n['failed']} failed" if n["failed"] else ""
        lines = [f"{self.folder}: {n['captioned']} captioned{kept}{failed}; {verb} {self.destination}."]
        if not self.completed:
            lines.append("Stopped before the end; the captions made so far were saved.")
        lines += [f"Failed: {e.error}" for e in self.failed]
        lines += [f"Warning: {w}" for w in self.warnings]
        lines.append(format_frequency(self.tag_counts(), top, total=len(self.captions)))
        return "\n".join(lines)


def output_target(root: Path, output: str) -> Path | None:
    """None for sidecar files, else the metadata file to write."""
    text = (output or "txt").strip()
    if text.lower() in ("txt", "sidecar", "sidecars", ".txt"):
        return None
    if text.lower() in ("csv", "jsonl"):
        return root / f"metadata.{text.lower()}"
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"caption output must be txt, csv, jsonl or a file ending in .csv/.jsonl; got {output!r}.")
    return path if len(path.parts) > 1 else root / path


def _shadow_warning(root: Path, target: Path | None, opts: CaptionOptions) -> str | None:
    """Training reads metadata.jsonl > metadata.csv > sidecars; warn when what we write would be ignored."""
    existing = Path(opts.metadata_path) if opts.metadata_path else find_metadata(root)
    if existing is None or (target is not None and existing.resolve() == target.resolve()):
        return None
    if target is None or existing.suffix.lower() == ".jsonl":
        wrote = "sidecar files" if target is None else target.name
        return (f"{existing.name} in {existing.parent} is read before {wrote} when training, so images it "
                f"lists keep its captions. Write with output={existing.suffix.lstrip('.')} instead, or "
                f"remove {existing.name}.")
    return None


def caption_dataset(folder: str | Path, captioner, options: CaptionOptions | None = None,
                    progress: Progress | None = None) -> CaptionResult:
    """Caption the images of a dataset folder (flat or kohya `N_name` subfolders) with `captioner`."""
    opts = options or CaptionOptions()
    root = Path(folder).expanduser()
    scan = scan_dataset(root, caption_extension=opts.caption_extension, metadata_path=opts.metadata_path,
                        min_image_size=1)
    if scan.undecodable:  # a captioner rewrites caption files: never on top of ones it cannot read
        raise scan.undecodable[0]
    warnings = [w for w in scan.warnings if "have no caption" not in w]
    target = output_target(root, opts.output)
    shadow = _shadow_warning(root, target, opts)
    if shadow:
        warnings.append(shadow)

    entries: dict[Path, CaptionEntry] = {}
    todo = []
    for rec in scan.records:
        previous = rec.caption if rec.caption_source in ("metadata", "sidecar") else ""
        if opts.mode == "skip" and previous:
            entries[rec.path] = CaptionEntry(rec.path, previous, previous, "kept")
        else:
            entries[rec.path] = CaptionEntry(rec.path, previous, previous, "pending")
            todo.append(rec.path)
    written: list[Path] = []
    completed = False
    try:
        _run(captioner, todo, entries, opts, written, target, progress)
        completed = True
    finally:
        pending = [p for p, e in entries.items() if e.status == "pending"]
        for p in pending:
            del entries[p]
        if target is not None and not opts.dry_run and any(e.status == "captioned" for e in entries.values()):
            final = {p: e.caption for p, e in entries.items() if e.status != "failed"}
            if write_metadata(target, final, root):
                written.append(target)
        if not completed:
            logger.warning("captioning stopped after %d of %d images; their captions were saved",
                           sum(e.status == "captioned" for e in entries.values()), len(todo))
    destination = (f"{len(written)} caption file(s) ({opts.caption_extension})" if target is None
                   else str(target)) if not opts.dry_run else "nothing (dry run)"
    warnings += list(getattr(captioner, "warnings", []))  # e.g. a GPU provider that fell back to the CPU
    return CaptionResult(root, list(entries.values()), written, destination, warnings, opts.dry_run, completed)


def _run(captioner, todo: list[Path], entries: dict[Path, CaptionEntry], opts: CaptionOptions,
         written: list[Path], target: Path | None, progress: Progress | None) -> None:
    needs_images = getattr(captioner, "needs_images", True)
    batch_size = max(1, int(getattr(captioner, "batch_size", 1)))
    places_trigger = getattr(captioner, "uses_trigger", False)  # a template with {trigger} in it
    done = 0
    for start in range(0, len(todo), batch_size):
        batch, images = [], []
        for path in todo[start:start + batch_size]:
            try:
                images.append(load_image(path) if needs_images else None)
                batch.append(path)
            except DatasetError as exc:
                entries[path].status, entries[path].error = "failed", str(exc)
        generated = captioner.caption(images, batch) if batch else []
        new = {}
        for path, text in zip(batch, generated):
            entry = entries[path]
            entry.generated = clean_caption(text)
            merged = merge_caption(entry.previous, entry.generated, opts.mode)
            keep = places_trigger and merged == entry.generated
            entry.caption = merged if keep else insert_trigger(merged, opts.trigger)
            entry.status = "captioned"
            new[path] = entry.caption
        if target is None and not opts.dry_run:
            written += write_sidecars(new, opts.caption_extension)
        done += len(todo[start:start + batch_size])
        if progress is not None:
            progress(done, len(todo), str(todo[min(done, len(todo)) - 1]))


def caption_images(images: Sequence, captioner, *, names: Sequence[str] | None = None, trigger: str = "") -> list[str]:
    """Captions for in-memory images (ComfyUI IMAGE batches), trigger word first; writes nothing."""
    paths = [Path(n) for n in names] if names else [Path(f"image_{i:04d}.png") for i in range(len(images))]
    texts = captioner.caption(list(images), paths)
    return [insert_trigger(clean_caption(t), trigger) for t in texts]
