"""Captioning and the dataset check from the tab and the API, through the engine's own APIs.

Captioners are looked for where WebUI users keep them (`models/TaggerOnnx`, `models/interrogators`,
... see `engine.caption.A1111_SUBFOLDERS`); nothing is downloaded. The dataset check is the same
report `python -m engine check` prints, built with the request's settings.
"""

from __future__ import annotations

from pathlib import Path

from engine.caption import (A1111_SUBFOLDERS, COMFYUI_SUBFOLDERS, CaptionOptions, caption_dataset,
                            find_captioner_models, host_model_folders, load_captioner)
from engine.errors import DatasetError

from . import host

TEMPLATE = "template"


def model_folders() -> list[Path]:
    try:
        root = host.models_root()
    except ImportError:
        return []
    return host_model_folders(root, A1111_SUBFOLDERS + COMFYUI_SUBFOLDERS)


def captioner_choices() -> list[str]:
    """"template" plus every captioning model found in the WebUI's model folders."""
    return [TEMPLATE] + [m.name for m in find_captioner_models(model_folders())]


def caption_folder(folder: str, captioner: str = TEMPLATE, *, mode: str = "skip", trigger: str = "",
                   template: str = "", progress=None) -> str:
    """Caption `folder` and return the engine's summary (what was written, skipped, failed, top tags)."""
    folder = (folder or "").strip()
    if not folder or not Path(folder).expanduser().is_dir():
        raise DatasetError(f"the dataset folder '{folder}' does not exist or is not a folder.")
    kwargs = {"trigger": trigger}
    if template:
        kwargs["template"] = template
    model = load_captioner(captioner or TEMPLATE, model_folders(), **kwargs)
    result = caption_dataset(Path(folder).expanduser(), model, CaptionOptions(mode=mode, trigger=trigger),
                             progress=progress)
    return result.summary()


def check_folder(request: dict) -> str:
    """The engine's dataset report for this request's folder and settings."""
    from engine.check import check_dataset

    from .job import make_plan

    plan = make_plan(dict(request, preview_prompt=request.get("preview_prompt") or "check"),
                     lora_dir=host.lora_dir(), work_dir=host.work_dir())
    from engine.families import get_family

    return check_dataset(plan.cfg, native_resolution=get_family(_loaded_family()).resolution).to_text()


def _loaded_family() -> str:
    from .adapter import model_family

    model = host.peek_model()
    return model_family(model) if model is not None else "sd1"
