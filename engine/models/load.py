"""Load a user's base model (single .safetensors/.ckpt file or diffusers folder) fully offline.

diffusers' `from_single_file` fetches config files from the hub; we never do. Single files are
converted with diffusers' public LDM converters into components built from our own configs
(`engine.models.configs`), assigned in place without a random init; folders load with
`local_files_only=True`. The result is a `DiffusersModel` that owns its weights: frozen, cast to the
compute dtype once, the VAE kept in fp32 (exact latents; the SDXL VAE overflows in fp16).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ModelError
from .checkpoint_file import file_sha256, read_shapes, read_state_dict
from .clip_tokenizer import clip_tokenizer
from .configs import ModelConfigs, build_components, model_configs
from ..families import get_family
from .detect import Detection, detect_checkpoint, detect_folder
from .diffusers_adapter import DiffusersModel
from .module_state import require_xformers
from .prediction import resolve_prediction_type

logger = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "no": torch.float32}


def resolve_device(device) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; anything else as torch understands it."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16.") from None


def load_base_model(path, *, device="cpu", dtype=torch.float32, prediction_type: str = "auto", clip_skip: int = 0,
                    attention: str = "sdpa", hash_file: bool = False, configs: ModelConfigs | None = None,
                    sampler: str = "ddim") -> DiffusersModel:
    """Load SD1.x / SD2.x / SDXL from a local file or diffusers folder. Never touches the network.

    `hash_file` computes the file's sha256 now (ModelInfo.sha256, kohya's ss_new_sd_model_hash); it
    reads the whole file, so it is off by default (`checkpoint_file.file_sha256(model.source_path)`
    does it later). `configs` replaces the family's standard configs (tiny test checkpoints).
    """
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ModelError(f"base_model '{path}' does not exist. Give the path of a .safetensors/.ckpt "
                         f"checkpoint or of a diffusers folder.")
    if attention == "xformers":
        require_xformers()
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    notes: list[str] = []
    if p.is_dir():
        det = detect_folder(p)
        unet, vae, tes, toks = _load_folder(p, det)
        pad_ids = None  # the family's
    else:
        shapes = read_shapes(p)
        state = None
        if shapes is None:  # a pickle: its keys are known only after loading
            state = read_state_dict(p)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        det = detect_checkpoint(shapes, p.name)
        if configs is None and not det.standard:
            raise ModelError(f"'{p.name}' looks like {det.description} but its layer sizes are not the standard "
                             f"{get_family(det.family).display_name} ones, so it cannot be built offline. Use a diffusers "
                             f"folder of it (its configs come with it).")
        cfgs = configs or model_configs(det.family)
        if cfgs.family != det.family:
            raise ModelError(f"'{p.name}' is {det.description}, but {cfgs.family} configs were given.")
        if state is None:
            state = read_state_dict(p)
        unet, vae, tes = _from_single_file(state, det, cfgs, p.name)
        del state
        toks = [clip_tokenizer() for _ in tes]
        pad_ids = cfgs.pad_ids

    for module in (unet, vae, *tes):
        module.requires_grad_(False).eval()
    # nn.Module.to directly: diffusers' override warns about fp32 modules on every cast (none here)
    torch.nn.Module.to(unet, device, dtype)
    torch.nn.Module.to(vae, device, torch.float32)
    for te in tes:
        torch.nn.Module.to(te, device, dtype)
    if device.type == "cpu":
        _realign(unet, vae, *tes)

    ptype = resolve_prediction_type(prediction_type, det, path=p, unet=unet, notes=notes)
    if det.ztsnr:
        notes.append("the checkpoint has a 'ztsnr' key: using the zero-terminal-SNR schedule")
        logger.info(notes[-1])
    model = DiffusersModel.from_components(
        unet=unet, vae=vae, text_encoders=tes, tokenizers=toks, family=det.family, prediction_type=ptype,
        name=p.name, clip_skip=clip_skip, owns_weights=True, device=device, dtype=dtype, attention=attention,
        sampler=sampler, zero_terminal_snr=det.ztsnr, notes=notes, source_path=p, pad_ids=pad_ids)
    if det.standard or get_family(det.family).v_resolution:  # SD2: 768-v and 512-base share one architecture
        model.info.resolution = get_family(det.family).native_resolution(ptype)
    if hash_file and p.is_file():
        model.info.sha256 = file_sha256(p)
    logger.info("loaded %s: %s, %s, %s on %s", p.name, det.description, ptype, str(dtype).replace("torch.", ""),
                device)
    return model


def _realign(*modules) -> None:
    """Copy tensors that a file left at odd byte offsets into fresh memory: CPU kernels pick slower,
    numerically different code paths for misaligned weights (outputs would differ at 1e-6)."""
    with torch.no_grad():
        for module in modules:
            for t in module.parameters():
                if t.data_ptr() % 64:
                    t.data = t.data.clone()


# --- single files ---------------------------------------------------------------------------------

def te_keys_for(model, sd: dict, *, wrapped: bool | None = None) -> dict:
    """Match key prefixes to the installed transformers (>= 5.6 dropped CLIPTextModel's `text_model.`)
    and drop `position_ids`, which some old merges store corrupted and the model rebuilds anyway.
    `wrapped=True` gives the HF file layout (`text_model.*`) whatever transformers builds."""
    wrapped = hasattr(model, "text_model") if wrapped is None else wrapped
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        out[bare if not wrapped or bare.startswith("text_projection") else "text_model." + bare] = value
    return out


def _assign(model, sd: dict, what: str, name: str) -> None:
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"'{name}': the {what} weights are incomplete ({len(missing)} missing, e.g. "
                         f"{', '.join(missing[:3])}). The file is damaged or a non-standard variant; download "
                         f"it again or use a diffusers folder.")
    if result.unexpected_keys:
        logger.debug("%s: %d unused %s keys, e.g. %s", name, len(result.unexpected_keys), what,
                     result.unexpected_keys[:3])


def _from_single_file(sd: dict, det: Detection, cfgs: ModelConfigs, name: str):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    unet, vae, tes = build_components(cfgs, empty=True)
    try:
        unet_sd = convert_ldm_unet_checkpoint(sd, cfgs.unet)
        vae_sd = convert_ldm_vae_checkpoint(sd, cfgs.vae)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelError(f"'{name}' could not be converted ({type(exc).__name__}: {exc}); the file is damaged "
                         f"or an unusual variant of {get_family(det.family).display_name}.") from None
    _assign(unet, unet_sd, "UNet", name)
    _assign(vae, vae_sd, "VAE", name)
    del unet_sd, vae_sd
    for te, prefix in zip(tes, det.te_prefixes):
        if prefix.endswith(".transformer."):  # HF CLIP layout (CLIP-L)
            te_sd = convert_ldm_clip_checkpoint(sd)
        else:  # OpenCLIP layout (SD2's ViT-H, SDXL's bigG): fused qkv, resblocks
            te_sd = convert_open_clip_checkpoint(te, sd, prefix=prefix)
        _assign(te, te_keys_for(te, te_sd), f"text encoder ({prefix.rstrip('.')})", name)
    return unet, vae, tes


# --- diffusers folders ----------------------------------------------------------------------------

def _from_pretrained(cls, folder: Path, what: str, **kwargs):
    """One component of a diffusers folder, from its files only (a missing folder never becomes a hub id)."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"the diffusers folder '{folder.parent}' has no {folder.name}/config.json: its {what} is "
                         f"missing. Copy the model's whole {folder.name}/ folder there (nothing is downloaded).")
    errors = []
    for variant in (None, "fp16"):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True, variant=variant, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise ModelError(f"cannot load the {what} from '{folder}': {errors[0]} Is the diffusers folder complete?")


def _load_folder(folder: Path, det: Detection):
    """Components of a diffusers folder. Tokenizers are the built-in CLIP one (identical BPE for every
    SD model) unless an encoder's vocabulary was extended, e.g. by a DreamBooth with new tokens."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

    unet = _from_pretrained(UNet2DConditionModel, folder / "unet", "UNet")
    vae = _from_pretrained(AutoencoderKL, folder / "vae", "VAE")
    names = [("text_encoder", "tokenizer", CLIPTextModel)]
    if det.family == "sdxl":
        names.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
    tes, toks = [], []
    for te_dir, tok_dir, cls in names:
        te = _from_pretrained(cls, folder / te_dir, te_dir)
        tes.append(te)
        if te.config.vocab_size == 49408:
            toks.append(clip_tokenizer())
            continue
        try:
            if not (folder / tok_dir).is_dir():
                raise OSError(f"no folder {folder / tok_dir}")
            toks.append(CLIPTokenizerFast.from_pretrained(str(folder / tok_dir), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder.name}/{te_dir} has {te.config.vocab_size} tokens (extended vocabulary) "
                             f"but {tok_dir}/ cannot be read ({exc}). Copy the folder again.") from None
    return unet, vae, tes, toks
