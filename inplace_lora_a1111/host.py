"""Everything this extension asks of the WebUI itself, in one place and imported lazily.

The adapter and the job never import `modules.*` at module level: the package must import (and be
tested) without a WebUI, and Forge has a different `modules` tree. Functions here answer: is this
Forge, can the loaded model be trained in place with these flags (`refusal`), which adapter drives it,
where do LoRA files and work files go, and how do we undo the built-in Lora extension's merged weights
and caches. On Forge and its forks each answer comes from forge_host.py.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

def is_forge() -> bool:
    """Forge ships `modules_forge` next to `modules`; its model objects carry `forge_objects`."""
    try:
        if importlib.util.find_spec("modules_forge") is not None:
            return True
    except (ImportError, ValueError):
        pass
    return hasattr(peek_model(), "forge_objects")


def peek_model():
    """The loaded model, or None when none is loaded yet; never triggers a load (`shared.sd_model`
    would load one, which can take minutes)."""
    try:
        from modules import sd_models

        return sd_models.model_data.sd_model
    except Exception:
        return None


def loaded_model():
    """The model A1111 has loaded (loads it if the WebUI has not yet, as txt2img would)."""
    from modules import shared

    model = forge_host().loaded_model() if is_forge() else shared.sd_model
    if model is None:
        from engine.errors import ModelError

        raise ModelError("no Stable Diffusion checkpoint is loaded; pick one in the checkpoint dropdown at the "
                         "top of the page (or POST /sdapi/v1/options sd_model_checkpoint) and try again.")
    return model


def refusal(sd_model, *, train_text_encoder: bool) -> str | None:
    """Why this model cannot be trained in place with the WebUI's current flags (None: it can)."""
    if is_forge() or hasattr(sd_model, "forge_objects"):
        return forge_host().refusal(sd_model, train_text_encoder=train_text_encoder)
    from modules import devices, shared

    flags = shared.cmd_opts
    if getattr(flags, "lowvram", False):
        return ("--lowvram moves single UNet blocks between CPU and GPU inside every step, which breaks the "
                "backward pass; restart the WebUI with --medvram (UNet-only training) or without either flag.")
    medvram = getattr(flags, "medvram", False) or (getattr(flags, "medvram_sdxl", False)
                                                   and hasattr(sd_model, "conditioner"))
    if medvram and train_text_encoder:
        return ("with --medvram the text encoder and the UNet take turns on the GPU inside a step, so the text "
                "encoder cannot be trained; untick 'Train text encoder' (UNet-only training works), or restart "
                "without --medvram.")
    if getattr(sd_model, "is_sd3", False):
        return "SD3 models cannot be trained here yet; SD1.x, SD2.x and SDXL can."
    if getattr(sd_model, "is_ssd", False):
        return "SSD-1B (a distilled SDXL) cannot be trained here yet; SD1.x, SD2.x and SDXL can."
    if getattr(sd_model, "is_sdxl_inpaint", False) or _in_channels(sd_model) not in (None, 4):
        return "inpainting checkpoints cannot be trained here; load the matching non-inpainting checkpoint."
    if hasattr(sd_model, "conditioner"):
        text = [e for e in sd_model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]
        if len(text) != 2:
            return "the SDXL refiner cannot be trained here (it has one text encoder); load an SDXL base model."
    if getattr(devices, "fp8", False):
        return "FP8 weight storage is on (Settings > Optimizations > FP8 weight); set it to Disable to train."
    try:
        from modules import sd_unet

        if sd_unet.current_unet is not None:
            return ("an alternative UNet (e.g. TensorRT) is active; set Settings > SD Unet to None while training, "
                    "the LoRA then works with it after it is rebuilt.")
    except ImportError:
        pass
    return None


def forge_host():
    from . import forge_host as module

    return module


def trainable_model(sd_model, *, clip_skip: int = 0):
    """The adapter for the loaded model: Forge's objects or A1111's ldm/sgm model."""
    if hasattr(sd_model, "forge_objects"):
        from .forge_adapter import ForgeModel

        return ForgeModel(sd_model, clip_skip=clip_skip)
    from .adapter import A1111Model

    return A1111Model(sd_model, clip_skip=clip_skip)


def _in_channels(sd_model) -> int | None:
    try:
        return int(sd_model.model.diffusion_model.in_channels)
    except (AttributeError, TypeError, ValueError):
        return None


def lora_dir() -> Path:
    """Where the built-in Lora extension looks (`--lora-dir`, default models/Lora)."""
    from modules import shared

    configured = getattr(shared.cmd_opts, "lora_dir", None)
    if configured:
        return Path(configured)
    from modules import paths_internal

    return Path(paths_internal.models_path) / "Lora"


def work_dir() -> Path:
    """Checkpoints, configs and in-training previews: outputs/lora-trainer (never scanned as LoRAs)."""
    from modules import paths_internal

    return Path(paths_internal.default_output_dir) / "lora-trainer"


def models_root() -> Path:
    from modules import paths_internal

    return Path(paths_internal.models_path)


def _networks():
    try:
        import networks  # the built-in Lora extension's module, in sys.modules under this name

        return networks if hasattr(networks, "network_restore_weights_from_backup") else None
    except ImportError:
        return None


def unmerge_builtin_loras(sd_model) -> list[str]:
    """Put back the weights the built-in Lora extension merged for the last generation, so we do not
    train on top of the user's last LoRA. Returns the names that were merged."""
    import torch

    if hasattr(sd_model, "forge_objects"):
        return forge_host().unmerge_loras(sd_model)
    networks = _networks()
    if networks is None:
        return []
    names = [getattr(n, "name", str(n)) for n in networks.loaded_networks]
    with torch.no_grad():
        networks.loaded_networks.clear()
        for module in sd_model.modules():
            networks.network_restore_weights_from_backup(module)
            if hasattr(module, "network_current_names"):
                networks.network_reset_cached_weight(module)
    return names


def refresh_lora_list() -> bool:
    """Re-scan the Lora folder so the new file shows as a card (and in /sdapi/v1/loras); Forge's
    sd_forge_lora has the same function in its own `networks` module."""
    try:
        import networks
    except ImportError:
        return False
    if not hasattr(networks, "list_available_networks"):
        return False
    networks.list_available_networks()
    return True


def clear_condition_cache() -> None:
    """txt2img keeps the last prompt's conditioning; after text-encoder training it would be stale."""
    try:
        from modules import processing

        processing.StableDiffusionProcessing.cached_c = [None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None]
    except (ImportError, AttributeError):
        pass


def queue_lock():
    """The lock every generation takes (txt2img, img2img, checkpoint changes)."""
    from modules import call_queue

    return call_queue.queue_lock


def state():
    from modules import shared

    return shared.state


def unique_name(stem: str, folders: list[Path]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... : no LoRA file or work folder of that name exists yet, so
    the WebUI can never serve weights it cached under the same name."""
    from engine.lora.output_names import free_name

    return free_name(stem, lambda name: any((f / f"{name}.safetensors").exists() or (f / name).exists()
                                            for f in folders))
