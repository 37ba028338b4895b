"""Where the four parts of a command-line Flux.1 run come from, for each way Flux is shared:

- a BFL transformer file (`flux1-dev.safetensors`): the transformer alone; the autoencoder and text
  encoders are the config's `ae`, `clip_l` and `t5xxl` files (kohya's --ae/--clip_l/--t5xxl);
- an all-in-one checkpoint (what ComfyUI's Load Checkpoint takes, e.g. flux1-dev-fp8.safetensors):
  `model.diffusion_model.*` (BFL transformer), `vae.*` (BFL ae), `text_encoders.clip_l.transformer.*`
  and `text_encoders.t5xxl.transformer.*` in one file;
- a diffusers folder (FLUX.1-dev as published): transformer/ (diffusers keys, converted to BFL's by
  flux_diffusers_keys.py), vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5), tokenizer_2/.

A path set in the config (`ae`, `clip_l`, `t5xxl`) wins over the part the checkpoint holds, and supplies
the parts it lacks. Everything loads into the same FluxModel; nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from . import flux_load as fl
from .checkpoint_file import SAFETENSORS_SUFFIXES, read_shapes, read_state_dict

PARTS = ("ae", "clip_l", "t5xxl")
WHAT = {"ae": "autoencoder", "clip_l": "CLIP-L text encoder", "t5xxl": "T5-XXL text encoder"}
# all-in-one checkpoint: the prefix each part's tensors sit under (ComfyUI's Flux model config)
AIO_PREFIXES = {"ae": ("vae.", "first_stage_model."), "clip_l": ("text_encoders.clip_l.transformer.",),
                "t5xxl": ("text_encoders.t5xxl.transformer.",)}
DIFFUSERS_DIRS = {"ae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"}
FILE_LOADERS = {"ae": fl.load_vae, "clip_l": fl.load_clip_l, "t5xxl": fl.load_t5}  # a part's own file


def is_flux_folder(path: Path) -> bool:
    """A diffusers FLUX.1 text-to-image folder (FluxPipeline, or a bare FluxTransformer2DModel's parent)."""
    if not path.is_dir():
        return False
    index, transformer = path / "model_index.json", path / "transformer" / "config.json"
    if index.is_file():
        return _json(index).get("_class_name") == "FluxPipeline"
    return transformer.is_file() and _json(transformer).get("_class_name") == "FluxTransformer2DModel"


def is_flux_source(path: Path) -> bool:
    return is_flux_folder(path) or fl.is_flux_file(path)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}. The diffusers folder is incomplete; copy it again.") from None


def _configured(cfg, key: str) -> Path | None:
    value = str(getattr(cfg, key, "") or "").strip()
    return Path(value).expanduser() if value else None


def part_loaders(cfg, path: Path) -> dict[str, Callable[[], torch.nn.Module]]:
    """One loader per part (ae, clip_l, t5xxl), or a ModelError naming every part nobody supplies."""
    inside = _folder_parts(path) if path.is_dir() else _file_parts(path)
    loaders, missing = {}, []
    for key in PARTS:
        given = _configured(cfg, key)
        if given is not None:
            if not given.is_file():
                raise ModelError(f"{key} points to '{given}', which is not a file.")
            loaders[key] = functools.partial(FILE_LOADERS[key], given)
        elif key in inside:
            loaders[key] = inside[key]
        else:
            missing.append(key)
    if missing:
        what = ", ".join(f"{k} (the {WHAT[k]})" for k in missing)
        if path.is_dir():
            dirs = ", ".join(DIFFUSERS_DIRS[k] + "/" for k in missing)
            raise ModelError(f"the diffusers Flux.1 folder '{path}' lacks {dirs}. Copy the whole folder, or set "
                             f"{what} in the config to the part's file.")
        raise ModelError(f"'{path.name}' is a Flux.1 transformer, which holds neither its autoencoder nor its text "
                         f"encoders. Set {', '.join(missing)} in the config to the paths of ae.safetensors, "
                         f"clip_l.safetensors and t5xxl_fp16.safetensors (kohya's --ae, --clip_l, --t5xxl), or use "
                         f"an all-in-one Flux checkpoint or a diffusers Flux folder.")
    return loaders


def load_transformer(path: Path, dtype: torch.dtype):
    if not path.is_dir():  # an all-in-one file: its transformer's tensors only
        sd = _read_prefixed(path, ("model.diffusion_model.", "diffusion_model."), keep_prefix=True)
        return fl.transformer_from_state_dict(sd or read_state_dict(path), dtype, path.name)
    files = sorted((path / "transformer").glob("*.safetensors"))
    if not files:
        raise ModelError(f"the diffusers Flux.1 folder '{path}' has no transformer/*.safetensors; copy it again.")
    sd = {}
    for f in files:  # diffusion_pytorch_model.safetensors, or its shards
        sd.update(read_state_dict(f))
    return fl.transformer_from_state_dict(sd, dtype, f"{path.name}/transformer")


def t5_tokenizer(cfg, path: Path):
    """The T5 tokenizer: t5xxl_tokenizer, the diffusers folder's tokenizer_2/, beside the t5xxl file, or
    beside the all-in-one checkpoint."""
    given = str(cfg.t5xxl_tokenizer or "")
    if not given and path.is_dir() and (path / "tokenizer_2").is_dir():
        given = str(path / "tokenizer_2")
    t5 = _configured(cfg, "t5xxl")
    if t5 is None:  # looked for beside the T5 weights: text_encoder_2/, or the checkpoint's folder
        t5 = path / "text_encoder_2" / "model.safetensors" if path.is_dir() else path
    return fl.t5_tokenizer(t5, given)


# --- the parts a checkpoint holds -----------------------------------------------------------------------

def _file_parts(path: Path) -> dict[str, Callable[[], torch.nn.Module]]:
    shapes = read_shapes(path) or {}
    held = {key: next((p for p in prefixes if any(k.startswith(p) for k in shapes)), None)
            for key, prefixes in AIO_PREFIXES.items()}
    build = {"ae": lambda sd: fl.vae_from_state_dict(sd), "clip_l": lambda sd: fl.clip_l_from_state_dict(sd, path.name),
             "t5xxl": lambda sd: fl.t5_from_state_dict(sd, path.name)}
    return {key: (lambda key=key, prefix=prefix: build[key](_read_prefixed(path, (prefix,))))
            for key, prefix in held.items() if prefix is not None}


def _folder_parts(path: Path) -> dict[str, Callable[[], torch.nn.Module]]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    classes = {"ae": AutoencoderKL, "clip_l": CLIPTextModel, "t5xxl": T5EncoderModel}
    return {key: (lambda key=key: classes[key].from_pretrained(str(path / DIFFUSERS_DIRS[key]), local_files_only=True))
            for key in PARTS if (path / DIFFUSERS_DIRS[key] / "config.json").is_file()}


def _read_prefixed(path: Path, prefixes: tuple[str, ...], *, keep_prefix: bool = False) -> dict:
    """The tensors under one of `prefixes` (prefix removed unless `keep_prefix`), read one by one from a
    .safetensors file so the other parts of an all-in-one checkpoint are not loaded with them."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), "pt", device="cpu") as f:
            keys = [k for k in f.keys() if k.startswith(prefixes)]
            return {(k if keep_prefix else _strip(k, prefixes)): f.get_tensor(k) for k in keys}
    return {(k if keep_prefix else _strip(k, prefixes)): v for k, v in read_state_dict(path).items()
            if k.startswith(prefixes)}


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    return key[len(next(p for p in prefixes if key.startswith(p))):]
