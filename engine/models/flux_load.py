"""Flux.1 from local files, as kohya's flux_train_network.py takes them: the BFL transformer
(`flux1-dev.safetensors`, `base_model`), the autoencoder (`ae`), CLIP-L (`clip_l`) and T5-XXL
(`t5xxl`), each its own file, or the same parts' state dicts as flux_sources.py takes them from an
all-in-one checkpoint or a diffusers folder. Sizes are read from the tensors' shapes, so tiny test files
load as the full ones do. Nothing is downloaded: the T5 tokenizer comes from `t5xxl_tokenizer` (a folder or
tokenizer.json), a `tokenizer.json` / `spiece.model` beside the T5 file, or the files of google/t5-v1_1-xxl
(what kohya loads) in the local Hugging Face cache; a missing one is an error that says where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError
from .checkpoint_file import read_shapes, read_state_dict

FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "img_in.weight")


def is_flux_file(path: Path) -> bool:
    """A BFL Flux.1 transformer file (or a checkpoint holding one under ComfyUI's prefix). A file whose
    header cannot be read is not one: the family detection that follows says what is wrong with it."""
    try:
        shapes = read_shapes(path) if path.is_file() else None
    except ModelError:
        return False
    return bool(shapes) and any(k.endswith(FLUX_MARKERS[0]) for k in shapes) and any(
        k.endswith(FLUX_MARKERS[1]) for k in shapes)


def load_transformer(path: Path, dtype: torch.dtype):
    return transformer_from_state_dict(read_state_dict(path), dtype, path.name)


def transformer_from_state_dict(sd: dict, dtype: torch.dtype, name: str = "transformer"):
    """The engine's FluxTransformer from BFL keys (bare or under ComfyUI's model prefix) or diffusers' keys."""
    from .flux_diffusers_keys import diffusers_to_bfl, is_diffusers_flux
    from .flux_model import FluxTransformer, flux_dims_from_state_dict

    prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.") if f"{p}img_in.weight" in sd), "")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    elif is_diffusers_flux(sd):
        sd = diffusers_to_bfl(sd, name)
    with torch.device("meta"):
        model = FluxTransformer(flux_dims_from_state_dict(sd))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model


def load_vae(path: Path):
    return vae_from_state_dict(read_state_dict(path))


def vae_from_state_dict(sd: dict):
    """The BFL autoencoder as diffusers' AutoencoderKL (channels read from the tensors)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .flux_tiny import flux_vae_config

    sd = {k.split("first_stage_model.", 1)[-1]: v for k, v in sd.items()}
    ch = sd["encoder.conv_in.weight"].shape[0]
    mults = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    blocks = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in mults]
    per_block = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    config = dict(flux_vae_config(), block_out_channels=blocks, layers_per_block=per_block,
                  norm_num_groups=32 if ch % 32 == 0 else ch, latent_channels=sd["decoder.conv_in.weight"].shape[1])
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae


def load_clip_l(path: Path):
    return clip_l_from_state_dict(read_state_dict(path), path.name)


def clip_l_from_state_dict(sd: dict, name: str = "clip_l"):
    """CLIP-L text model (HF names, as ComfyUI and kohya store clip_l.safetensors)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .load import te_keys_for

    sd = {k.split("transformer.", 1)[-1] if k.startswith(("clip_l.", "te1.")) else k: v for k, v in sd.items()}
    emb = sd.get("text_model.embeddings.token_embedding.weight")
    if emb is None:
        raise ModelError(f"'{name}' is not a CLIP-L text encoder file (no text_model.embeddings).")
    hidden = emb.shape[1]
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    config = CLIPTextConfig(vocab_size=emb.shape[0], hidden_size=hidden, num_hidden_layers=layers,
                            intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_attention_heads=max(1, hidden // 64), max_position_embeddings=77,
                            hidden_act="quick_gelu", projection_dim=hidden)
    model = CLIPTextModel(config)
    missing, unexpected = model.load_state_dict(te_keys_for(model, sd), strict=False)
    if [k for k in missing if "position_ids" not in k] or [k for k in unexpected if "text_projection" not in k]:
        raise ModelError(f"'{name}' does not fit CLIP-L: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return model


def load_t5(path: Path):
    return t5_from_state_dict(read_state_dict(path), path.name)


def t5_from_state_dict(sd: dict, name: str = "t5xxl"):
    """T5 v1.1 encoder (T5-XXL: 24 layers, 4096 wide, gated GELU) in transformers' names."""
    from transformers import T5Config, T5EncoderModel

    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "shared.weight" not in sd:
        raise ModelError(f"'{name}' is not a T5 encoder file (no shared.weight).")
    q = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    config = T5Config(vocab_size=sd["shared.weight"].shape[0], d_model=q.shape[1], d_kv=q.shape[0] // heads,
                      num_heads=heads, d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                      num_layers=len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")}),
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config)
    missing, _ = model.load_state_dict(sd, strict=False)
    if [k for k in missing if "embed_tokens" not in k]:
        raise ModelError(f"'{name}' does not fit a T5 encoder: missing {missing[:3]}.")
    return model


T5_REPO = "google/t5-v1_1-xxl"  # kohya's tokenizer; only ever read from the local Hugging Face cache


def t5_tokenizer(t5_path: Path, given: str = ""):
    """The T5 tokenizer from local files only (see the module docstring for where it is looked for).
    No hub id reaches transformers: the Hugging Face cache is looked up as files, and what is missing
    is named with the place to put it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    candidates = []
    if given:
        candidates.append(Path(given).expanduser())
        if not candidates[0].exists():
            raise ModelError(f"t5xxl_tokenizer points to '{given}', which does not exist: give a tokenizer.json file "
                             f"or a folder holding tokenizer.json or spiece.model (nothing is downloaded).")
    candidates += [t5_path.parent, t5_path.parent / "tokenizer_2", t5_path.parent / "t5_tokenizer"]
    candidates += _hf_cached(T5_REPO, ("tokenizer.json", "spiece.model"))
    for c in candidates:
        if c.is_file() and c.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(c), pad_token="<pad>", eos_token="</s>")
        if c.is_dir() and ((c / "tokenizer.json").is_file() or (c / "spiece.model").is_file()):
            return AutoTokenizer.from_pretrained(str(c), local_files_only=True)
    raise ModelError(f"no T5 tokenizer found: put tokenizer.json or spiece.model (from {T5_REPO}, or the tokenizer_2 "
                     f"folder of a FLUX.1 diffusers download) in {t5_path.parent}, beside the t5xxl file, or set "
                     f"t5xxl_tokenizer to that file or folder. Nothing is downloaded.")


def _hf_cached(repo: str, names: tuple[str, ...]) -> list[Path]:
    """Where the local Hugging Face cache holds one of `names` of `repo`: the file itself (a .json) or its
    snapshot folder. Reads the cache's files only (huggingface_hub's `try_to_load_from_cache`)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    found = []
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            found.append(Path(hit) if hit.endswith(".json") else Path(hit).parent)
    return found
