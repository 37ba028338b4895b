"""Finding the captioning models a user already has, and loading one by name or path.

The host adapters pass their model folders in (ComfyUI: `folder_paths.get_folder_paths("wd14_tagger")`
and friends; A1111: subfolders of `models/`); the engine never imports a host. Recognised layouts:
- WD14 tagger: `<dir>/model.onnx` + `selected_tags.csv` (a Hugging Face download), or
  `<name>.onnx` + `<name>.csv` side by side (ComfyUI-WD14-Tagger's folder);
- transformers model: a folder with `config.json`, weights and an image-processor config;
- either of those inside a Hugging Face cache folder `models--org--name/snapshots/<rev>/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ModelError
from .image_to_text import TransformersCaptioner, looks_like_transformers_folder
from .template import DEFAULT_TEMPLATE, TemplateCaptioner
from .wd14 import TagOptions, WD14Tagger

# Subfolders of a host's `models/` folder where users keep captioners (ComfyUI names first).
COMFYUI_SUBFOLDERS = ("wd14_tagger", "captioners", "LLM", "blip", "florence2")
A1111_SUBFOLDERS = ("TaggerOnnx", "interrogators", "captioners", "wd14_tagger", "BLIP", "LLM")
EXPECTED = ("a WD14 tagger (model.onnx + selected_tags.csv, or name.onnx + name.csv) or a transformers "
            "image-to-text folder (config.json + model.safetensors + preprocessor_config.json)")


@dataclass(frozen=True)
class CaptionerModel:
    """A captioning model found on disk."""

    name: str
    kind: str  # "wd14" | "transformers"
    path: Path  # the .onnx file, or the transformers folder
    tags_path: Path | None = None  # WD14 only


def host_model_folders(models_root: str | Path, subfolders: Iterable[str] = COMFYUI_SUBFOLDERS + A1111_SUBFOLDERS
                       ) -> list[Path]:
    """The conventional captioner folders that exist under a host's `models/` folder."""
    root = Path(models_root)
    seen, out = set(), []
    for name in subfolders:
        p = root / name
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _wd14_at(onnx: Path) -> CaptionerModel | None:
    for tags in (onnx.with_suffix(".csv"), onnx.parent / "selected_tags.csv"):
        if tags.is_file():
            name = onnx.parent.name if onnx.stem == "model" else onnx.stem
            return CaptionerModel(name, "wd14", onnx, tags)
    return None


def _hf_cache_name(folder: Path) -> str | None:
    return folder.name[len("models--"):].replace("--", "/") if folder.name.startswith("models--") else None


def _snapshots(folder: Path) -> list[Path]:
    snaps = folder / "snapshots"
    return sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime,
                  reverse=True) if snaps.is_dir() else []


def inspect_path(path: str | Path) -> CaptionerModel | None:
    """What a file or folder holds, if it is a captioner (None otherwise)."""
    path = Path(path)
    if path.is_file():
        return _wd14_at(path) if path.suffix.lower() == ".onnx" else None
    if not path.is_dir():
        return None
    if (path / "model.onnx").is_file():
        return _wd14_at(path / "model.onnx")
    if looks_like_transformers_folder(path):
        return CaptionerModel(path.name, "transformers", path)
    cache_name = _hf_cache_name(path)
    for snap in _snapshots(path) if cache_name else ():
        found = inspect_path(snap)
        if found:
            return CaptionerModel(cache_name, found.kind, found.path, found.tags_path)
    return None


def find_captioner_models(folders: Iterable[str | Path], max_depth: int = 2) -> list[CaptionerModel]:
    """Every captioner under the given folders (searched `max_depth` levels deep), WD14 taggers first."""
    found: dict[Path, CaptionerModel] = {}

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            model = inspect_path(path)
            if model is not None:
                found.setdefault(model.path.resolve(), model)
            elif entry.is_dir() and depth < max_depth:
                walk(path, depth + 1)

    for folder in folders:
        folder = Path(folder)
        model = inspect_path(folder)
        if model is not None:
            found.setdefault(model.path.resolve(), model)
        elif folder.is_dir():
            walk(folder, 1)
    return sorted(found.values(), key=lambda m: (m.kind != "wd14", m.name.lower()))


def resolve_captioner(spec: str, folders: Iterable[str | Path] = ()) -> CaptionerModel | None:
    """A model from a path or a name found in `folders`; None means the template captioner."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "template"):
        return None
    folders = [Path(f) for f in folders]
    path = Path(spec).expanduser()
    if path.exists():
        model = inspect_path(path)
        inside = find_captioner_models([path]) if model is None and path.is_dir() else []
        if len(inside) > 1:
            raise ModelError(f"{path} holds several captioning models ({', '.join(m.name for m in inside)}); "
                             f"pass one of their names or paths.")
        model = model or (inside[0] if inside else None)
        if model is None:
            raise ModelError(_not_a_model(path))
        return model
    models = find_captioner_models(folders)
    wanted = spec.lower()
    for model in models:
        if wanted in (model.name.lower(), model.path.name.lower(), model.path.stem.lower()):
            return model
    looked = ", ".join(str(f) for f in folders) or "no model folders (pass one with --models-dir)"
    have = ", ".join(m.name for m in models) or "none"
    raise ModelError(f"captioning model '{spec}' not found. Expected {EXPECTED}, given as a path or a name. "
                     f"Looked in: {looked}. Models found there: {have}. Without a model, use the "
                     f"'template' captioner.")


def _not_a_model(path: Path) -> str:
    if path.suffix.lower() == ".onnx":
        return (f"{path} has no tag list: expected {path.with_suffix('.csv')} or "
                f"{path.parent / 'selected_tags.csv'} next to it (download selected_tags.csv from the "
                f"same model page).")
    if path.is_dir() and (path / "config.json").is_file():
        return (f"{path} has a config.json but is missing the weights (model.safetensors) or the image "
                f"processor (preprocessor_config.json / processor_config.json); copy the whole model folder.")
    return f"{path} is not a captioning model: expected {EXPECTED}."


def load_captioner(spec: str = "template", folders: Iterable[str | Path] = (), *, device: str = "auto",
                   batch_size: int = 4, tag_options: TagOptions | None = None, prompt: str = "",
                   max_length: int = 75, num_beams: int = 1, trust_remote_code: bool = False,
                   template: str = DEFAULT_TEMPLATE, trigger: str = ""):
    """Build the captioner named by `spec` ("template", a model name found in `folders`, or a path)."""
    model = resolve_captioner(spec, folders)
    if model is None:
        return TemplateCaptioner(template, trigger=trigger)
    if model.kind == "wd14":
        return WD14Tagger(model.path, model.tags_path, device=device, options=tag_options, batch_size=batch_size)
    return TransformersCaptioner(model.path, prompt=prompt, max_length=max_length, num_beams=num_beams,
                                 batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
