"""Captioning a dataset with the models users already have: WD14 ONNX taggers, transformers
image-to-text models and templates; all local, nothing downloaded.

Hosts call:
    models = find_captioner_models(folders)                  # what the user has (for a dropdown)
    captioner = load_captioner(name_or_path, folders, ...)   # or "template"
    result = caption_dataset(folder, captioner, CaptionOptions(...), progress=cb)
    result.summary(), result.tag_counts(), result.entries
    caption_images(pil_images, captioner, trigger=...)       # in-memory images, nothing written
"""

from .discovery import (A1111_SUBFOLDERS, COMFYUI_SUBFOLDERS, CaptionerModel, find_captioner_models,
                        host_model_folders, load_captioner, resolve_captioner)
from .image_to_text import TransformersCaptioner
from .run import CaptionEntry, CaptionOptions, CaptionResult, caption_dataset, caption_images
from .tags import MODES, format_frequency, format_tag, merge_caption
from .template import DEFAULT_TEMPLATE, TemplateCaptioner
from .wd14 import TagOptions, WD14Tagger, select_tags
from .writers import write_atomic, write_metadata, write_sidecars

__all__ = [
    "A1111_SUBFOLDERS", "COMFYUI_SUBFOLDERS", "CaptionEntry", "CaptionOptions", "CaptionResult", "CaptionerModel",
    "DEFAULT_TEMPLATE", "MODES", "TagOptions", "TemplateCaptioner", "TransformersCaptioner", "WD14Tagger",
    "caption_dataset", "caption_images", "find_captioner_models", "format_frequency", "format_tag",
    "host_model_folders", "load_captioner", "merge_caption", "resolve_captioner", "select_tags",
    "write_atomic", "write_metadata", "write_sidecars",
]
