"""Sentence captions from a transformers image-to-text model in a local folder (BLIP, GIT, Florence-2...).

The folder is what `save_pretrained` writes (or a Hugging Face snapshot the user already has):
`config.json`, the weights, and the processor/tokenizer files. Loading is always `local_files_only`;
nothing is fetched. The model is built with the auto class that matches its config
(`AutoModelForImageTextToText`, the successor of `AutoModelForVision2Seq`, then `AutoModelForCausalLM`
for GIT-style models), so one code path serves every compatible model. A prompt or task token
(`<MORE_DETAILED_CAPTION>` for Florence-2, `a photography of` for BLIP) is passed to the processor.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Sequence

from ..data.images import to_rgb
from ..errors import ModelError
from .tags import clean_caption

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def looks_like_transformers_folder(folder: Path) -> bool:
    """A folder with a config, weights and an image processor: something `from_pretrained` can load."""
    if not (folder / "config.json").is_file():
        return False
    has_weights = any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in folder.iterdir())
    return has_weights and any((folder / name).is_file() for name in PROCESSOR_FILES)


def _pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TransformersCaptioner:
    """Caption images with a local transformers model; `caption(images)` returns one sentence per image."""

    kind = "transformers"

    def __init__(self, folder: str | Path, *, prompt: str = "", max_length: int = 75, num_beams: int = 1,
                 batch_size: int = 4, device: str = "auto", strip_prompt: bool = False,
                 trust_remote_code: bool = False):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.prompt, self.max_length, self.num_beams = prompt, int(max_length), int(num_beams)
        self.batch_size, self.strip_prompt = max(1, int(batch_size)), strip_prompt
        self.warnings: list[str] = []
        self._check_folder()
        self.device = _pick_device(device)
        self.processor, self.model = self._load(trust_remote_code)
        self._drop = [] if "token_type_ids" in inspect.signature(self.model.forward).parameters else ["token_type_ids"]

    def _check_folder(self) -> None:
        if not self.folder.is_dir():
            raise ModelError(f"captioning model folder {self.folder} does not exist.")
        missing = [name for name in ("config.json",) if not (self.folder / name).is_file()]
        if not any((self.folder / n).is_file() for n in PROCESSOR_FILES):
            missing.append(" or ".join(PROCESSOR_FILES))
        if missing:
            raise ModelError(f"{self.folder} is not a transformers captioning model: expected "
                             f"{', '.join(missing)} in it (the files save_pretrained writes).")

    def _load(self, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            processor = AutoProcessor.from_pretrained(self.folder, **kwargs)
        except Exception as exc:
            raise ModelError(self._load_hint("processor", exc, config, trust_remote_code)) from None
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        errors = []
        for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
            try:
                model = auto.from_pretrained(self.folder, dtype=dtype, **kwargs)
                break
            except (ValueError, KeyError) as exc:  # config not mapped by this auto class
                errors.append(f"{auto.__name__}: {exc}")
            except Exception as exc:
                raise ModelError(self._load_hint("model", exc, config, trust_remote_code)) from None
        else:
            raise ModelError(self._load_hint("model", "; ".join(errors), config, trust_remote_code))
        if not hasattr(model, "generate"):
            raise ModelError(f"{self.folder.name} ({type(model).__name__}) cannot generate text, so it "
                             f"cannot caption images.")
        model.to(self.device).eval()
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only models continue the prompt on the right
        return processor, model

    def _load_hint(self, what: str, exc, config: dict, trust_remote_code: bool) -> str:
        text = f"cannot load the {what} from {self.folder}: {exc}"
        if "auto_map" in config and not trust_remote_code:
            text += (" This model ships its own Python code (auto_map in config.json); allow it with "
                     "--trust-remote-code only if you trust the folder's .py files.")
        return text

    def caption(self, images: Sequence, paths: Sequence[Path] | None = None) -> list[str]:
        import torch

        out: list[str] = []
        for i in range(0, len(images), self.batch_size):
            batch = [to_rgb(im) for im in images[i:i + self.batch_size]]
            kwargs = {"images": batch, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(batch)
            inputs = self.processor(**kwargs).to(self.device)
            for key in self._drop:
                inputs.pop(key, None)  # BERT tokenizers add token_type_ids, which GIT's generate refuses
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_length, num_beams=self.num_beams)
            out.extend(self._decode(ids))
        return out

    def _decode(self, ids) -> list[str]:
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        result = []
        for text in texts:
            text = clean_caption(text)
            if self.strip_prompt and self.prompt and text.lower().startswith(self.prompt.strip().lower()):
                text = clean_caption(text[len(self.prompt.strip()):])
            result.append(text)
        return result
