"""Which model is this? Family detection from checkpoint keys and shapes, and from diffusers folders.

We train SD1.x, SD2.x and SDXL base. Everything else a user may point `base_model` at gets a
`ModelError` that names what the file is (a Flux or SD3 checkpoint, an SDXL refiner, an inpainting
model, a LoRA, a lone VAE) and what to use instead. Detection needs only names and shapes, so a
.safetensors file is judged from its header before gigabytes are read.

Markers (all shapes are [out, in]):
- UNet `model.diffusion_model.*attn2.to_k.weight` in-dim: 768 SD1.x, 1024 SD2.x, 2048 SDXL base,
  1280 SDXL refiner; `input_blocks.0.0.weight` in-channels 4 (9 = inpainting, 8 = pix2pix, ...).
- Text encoders: `cond_stage_model.transformer.` (CLIP-L, SD1), `cond_stage_model.model.` (OpenCLIP,
  SD2), `conditioner.embedders.0/1.` (SDXL: CLIP-L + bigG; the refiner has bigG alone at 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import ModelError
from ..families import get_family, supported_text

SUPPORTED = f"this trainer trains {supported_text()} (base) models"
PICK = f"Pick an {supported_text('or')} checkpoint as base_model."
UNET = "model.diffusion_model."


@dataclass
class Detection:
    """What a checkpoint or folder holds, as far as names and shapes tell."""

    family: str  # sd1 | sd2 | sdxl
    description: str
    layout: str = "ldm"  # "ldm" (single file) | "diffusers" (folder)
    standard: bool = True  # full-size dims of the family (False: a tiny test model or an odd variant)
    v_pred_marker: bool = False  # a `v_pred` key: ComfyUI writes it when it saves a v-prediction model
    ztsnr: bool = False  # a `ztsnr` key: trained with zero terminal SNR
    scheduler_prediction_type: str | None = None  # from a diffusers folder's scheduler config
    te_prefixes: list[str] = field(default_factory=list)


# Architectures we do not train: (name, test over the key set). Order matters where keys overlap.
def _any(keys, *subs):
    return any(s in k for k in keys for s in subs)


_FOREIGN: list[tuple[str, Callable[[set], bool]]] = [
    ("a Playground v2.5 checkpoint (EDM schedule on the SDXL architecture)", lambda k: "edm_mean" in k),
    ("an EDM v-prediction SDXL checkpoint (CosXL-style)", lambda k: "edm_vpred.sigma_max" in k),
    ("a Chroma checkpoint", lambda k: _any(k, "distilled_guidance_layer.")),
    ("a Flux.2 checkpoint", lambda k: _any(k, "single_stream_modulation.", "double_stream_modulation_img")),
    ("a Flux checkpoint", lambda k: _any(k, "double_blocks.0.img_attn", "single_blocks.0.linear1")),
    ("an SD3 / SD3.5 checkpoint", lambda k: _any(k, "joint_blocks.0.")),
    ("an AuraFlow checkpoint", lambda k: _any(k, "double_layers.0.attn.w2q")),
    ("a HunyuanDiT checkpoint", lambda k: _any(k, "mlp_t5.", "text_embedding_padding")),
    ("a Hunyuan Video checkpoint", lambda k: _any(k, "txt_in.individual_token_refiner")),
    ("a HiDream checkpoint", lambda k: _any(k, "double_stream_blocks.0.")),
    ("a Stable Cascade checkpoint", lambda k: _any(k, "clip_txt_mapper.", ".channelwise.")),
    ("a Lumina / Z-Image checkpoint", lambda k: _any(k, "cap_embedder.")),
    ("a Wan video checkpoint", lambda k: _any(k, "head.modulation")),
    ("an LTX-Video checkpoint", lambda k: _any(k, "patchify_proj.")),
    ("a Qwen-Image checkpoint", lambda k: _any(k, "img_mod.1.", "txt_mod.1.")),
    ("a PixArt / Sana checkpoint", lambda k: _any(k, "t_block.1.", "y_embedder.", "cross_attn.q_linear",
                                                  "adaln_single.")),
    ("a Cosmos checkpoint", lambda k: _any(k, "net.x_embedder.")),
    ("a Stable Video Diffusion checkpoint", lambda k: _any(k, ".time_stack.", ".time_mixer.")),
    ("an AnimateDiff motion module", lambda k: _any(k, "motion_modules.")),
    ("a ControlNet", lambda k: _any(k, "control_model.", "controlnet_cond_embedding", "input_hint_block.")),
    ("an IP-Adapter", lambda k: _any(k, "ip_adapter.") or ("image_proj.proj.weight" in k)),
    ("an SD2 unCLIP (image variations) checkpoint", lambda k: _any(k, "embedder.model.", "noise_augmentor.")),
]

_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".hada_w1_a",
                  ".lokr_w1", ".lora_mid.weight", ".oft_blocks", ".dora_scale")


def _refuse(name: str, what: str, advice: str = "") -> ModelError:
    lead = f"'{name}' is {what}" if name else f"This is {what}"
    return ModelError(f"{lead}; {SUPPORTED}. {advice}".rstrip())


def detect_checkpoint(shapes: Mapping[str, Sequence[int]], name: str = "") -> Detection:
    """Family of a single-file checkpoint from its tensor names and shapes; ModelError otherwise."""
    keys = set(shapes)
    if not keys:
        raise ModelError(f"'{name}' contains no tensors: it is empty or damaged. Download it again.")

    n_lora = sum(k.endswith(_LORA_SUFFIXES) for k in keys)
    if n_lora or any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lycoris_")) for k in keys):
        raise _refuse(name, f"a LoRA/LyCORIS file ({max(n_lora, 1)} LoRA tensors), not a base model",
                      "Set base_model to the full checkpoint the LoRA was made for; to continue training "
                      "this LoRA, put it in network_weights.")
    if keys <= {"emb_params", "string_to_param", "string_to_token", "name", "step", "clip_l", "clip_g",
                "sd_checkpoint", "sd_checkpoint_name"} or "string_to_param.*" in keys:
        raise _refuse(name, "a textual-inversion embedding, not a base model",
                      "Set base_model to a full checkpoint.")
    for what, test in _FOREIGN:
        if test(keys):
            raise _refuse(name, what, PICK)

    unet_keys = [k for k in keys if k.startswith(UNET)]
    if not unet_keys:
        raise _no_unet(keys, name)

    def shape(key):
        return tuple(shapes[key]) if key in shapes else None

    in_conv = shape(UNET + "input_blocks.0.0.weight")
    in_ch = in_conv[1] if in_conv and len(in_conv) == 4 else None
    channels = in_conv[0] if in_conv else None
    to_k = sorted(k for k in unet_keys if k.endswith("attn2.to_k.weight"))
    ctx = shape(to_k[0])[-1] if to_k else None
    adm = shape(UNET + "label_emb.0.0.weight")
    adm = adm[-1] if adm else None
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    sgm_l, sgm_g0, sgm_g1 = (has("conditioner.embedders.0.transformer."), has("conditioner.embedders.0.model."),
                             has("conditioner.embedders.1.model."))

    if ctx == 1280 or adm == 2560:
        raise _refuse(name, "an SDXL refiner (it only refines the base model's latents)",
                      "Train on SDXL base 1.0 or a fine-tune of it; LoRAs trained on the base work with it.")
    if sgm_g1 or ctx == 2048 or adm == 2816:
        family, te_prefixes = "sdxl", ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]
    elif has("cond_stage_model.model.") or ctx == 1024 or sgm_g0:
        family = "sd2"
        te_prefixes = ["cond_stage_model.model." if has("cond_stage_model.model.") else "conditioner.embedders.0.model."]
    elif has("cond_stage_model.transformer.") or sgm_l or ctx == 768:
        family, te_prefixes = "sd1", ["cond_stage_model.transformer." if has("cond_stage_model.transformer.")
                                      else "conditioner.embedders.0.transformer."]
    else:
        raise _refuse(name, f"a UNet checkpoint that is not {supported_text('or')} (cross-attention width {ctx})",
                      PICK)

    spec = get_family(family)
    label = spec.display_name
    special = {9: "inpainting model (9 input channels)", 8: "InstructPix2Pix model (8 input channels)",
               5: "depth-conditioned model (5 input channels)", 7: "x4 upscaler (7 input channels)"}
    if in_ch is not None and in_ch != 4:
        what = special.get(in_ch, f"model with {in_ch} input channels")
        raise _refuse(name, f"an {label} {what}, not a text-to-image base model",
                      f"Train on the regular {label} model; a LoRA trained there also works on its "
                      f"inpainting variant.")
    missing = [p for p in te_prefixes if not has(p)]
    if missing:
        raise ModelError(f"'{name}' is an {label} UNet without its text encoder (no '{missing[0]}*' "
                         f"weights). Use the full checkpoint (UNet + text encoder + VAE) or a diffusers folder.")
    if not has("first_stage_model."):
        raise ModelError(f"'{name}' is an {label} checkpoint without a VAE (no 'first_stage_model.*' "
                         f"weights). Use a checkpoint with the VAE baked in, or a diffusers folder.")
    standard = ctx == spec.context_dim and channels == 320
    return Detection(family=family, description=f"{label} checkpoint", layout="ldm", standard=standard,
                     v_pred_marker="v_pred" in keys, ztsnr="ztsnr" in keys, te_prefixes=te_prefixes)


def _no_unet(keys: set[str], name: str) -> ModelError:
    """Name the kind of partial file: VAE, text encoder, bare UNet."""
    if any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in keys) and \
            any(k.startswith(("decoder.", "first_stage_model.decoder.")) for k in keys):
        return _refuse(name, "a VAE on its own, not a base model",
                       "Set base_model to the full checkpoint; the VAE baked into it is used.")
    if _any(keys, "text_model.encoder.layers.", "transformer.resblocks.", "encoder.block.0.layer."):
        return _refuse(name, "a text encoder on its own, not a base model", "Set base_model to the full checkpoint.")
    if "input_blocks.0.0.weight" in keys or any(k.startswith("diffusion_model.input_blocks.") for k in keys):
        return _refuse(name, "a bare UNet (no text encoder and VAE inside)",
                       "Use the full checkpoint (.safetensors with UNet, text encoder and VAE) or a diffusers folder.")
    if "conv_in.weight" in keys and _any(keys, "down_blocks.0."):
        return _refuse(name, "the UNet weights of a diffusers folder",
                       "Pass the diffusers folder itself (the one with model_index.json).")
    sample = ", ".join(sorted(keys)[:3])
    return ModelError(f"'{name}' is not a Stable Diffusion checkpoint (no 'model.diffusion_model.*' "
                      f"weights; first keys: {sample}). {SUPPORTED}.")


# ---------------------------------------------------------------------------------------------
# diffusers folders

_FOREIGN_PIPELINES = {
    "Flux": "a Flux", "StableDiffusion3": "an SD3", "PixArt": "a PixArt", "Sana": "a Sana",
    "Kolors": "a Kolors", "AuraFlow": "an AuraFlow", "HunyuanDiT": "a HunyuanDiT", "Lumina": "a Lumina",
    "StableCascade": "a Stable Cascade", "Wan": "a Wan", "QwenImage": "a Qwen-Image", "HiDream": "a HiDream",
    "Kandinsky": "a Kandinsky", "IF": "a DeepFloyd IF", "LatentConsistency": "an LCM", "Chroma": "a Chroma",
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}. The diffusers folder is incomplete; copy it again.") from None


def detect_folder(folder: Path) -> Detection:
    """Family of a diffusers folder (model_index.json, unet/config.json, scheduler config)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    unet_cfg_path = folder / "unet" / "config.json"
    if not index.is_file() and not unet_cfg_path.is_file():
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".safetensors", ".ckpt"))
        if (folder / "config.json").is_file() and (folder.parent / "model_index.json").is_file():
            raise ModelError(f"'{folder}' is one component of a diffusers model; pass its parent folder "
                             f"'{folder.parent}'.")
        hint = f" It holds {files[0]}: pass that file as base_model." if files else ""
        raise ModelError(f"'{folder}' is a folder but not a diffusers model (no model_index.json or "
                         f"unet/config.json).{hint}")
    cls = _read_json(index).get("_class_name", "") if index.is_file() else ""
    for stem, what in _FOREIGN_PIPELINES.items():
        if cls.startswith(stem):
            raise _refuse(folder.name, f"{what} diffusers model ({cls})", f"Pick an {supported_text('or')} model.")
    if not unet_cfg_path.is_file():
        raise ModelError(f"'{folder}' has no unet/config.json ({cls or 'unknown pipeline'}); "
                         f"{SUPPORTED}, as diffusers folders with a unet/ subfolder.")
    ucfg = _read_json(unet_cfg_path)
    ctx, in_ch = ucfg.get("cross_attention_dim"), ucfg.get("in_channels", 4)
    ctx = ctx[0] if isinstance(ctx, list) else ctx
    if "Refiner" in cls or ctx == 1280 or ("XL" in cls and not (folder / "text_encoder").is_dir()):
        raise _refuse(folder.name, "an SDXL refiner", "Train on SDXL base 1.0 or a fine-tune of it.")
    if ucfg.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir():
        family = "sdxl"
    elif ctx == 1024:
        family = "sd2"
    elif ctx == 768:
        family = "sd1"
    else:
        family = "sdxl" if "XL" in cls else ("sd2" if "OpenCLIP" in str(ucfg) else "sd1")
    if in_ch != 4:
        raise _refuse(folder.name, f"an {get_family(family).display_name} model with {in_ch} input channels "
                      f"(inpainting or another conditioned variant)", "Train on the regular text-to-image model.")
    sched = folder / "scheduler" / "scheduler_config.json"
    ptype = _read_json(sched).get("prediction_type") if sched.is_file() else None
    spec = get_family(family)
    standard = ctx == spec.context_dim and ucfg.get("block_out_channels", [320])[0] == 320
    return Detection(family=family, description=f"{spec.display_name} diffusers model", layout="diffusers",
                     standard=standard, scheduler_prediction_type=ptype)


def detect_path(path: Path) -> Detection:
    """Detection for a folder or a .safetensors file (no tensors read); pickles need their dict."""
    from .checkpoint_file import read_shapes

    path = Path(path)
    if path.is_dir():
        return detect_folder(path)
    shapes = read_shapes(path)
    if shapes is None:
        from .checkpoint_file import read_state_dict

        shapes = {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    return detect_checkpoint(shapes, path.name)


_V_WORDS = re.compile(r"(^|[^a-z])(v[-_ ]?pred(iction)?|768[-_]?v|vpred)([^a-z]|$)", re.I)


def name_suggests_v(name: str) -> bool:
    """'...768-v...', '...v-pred...', '...vpred...' in a file name: a hint, logged, never decisive."""
    return bool(_V_WORDS.search(name))
