"""What the trainer asks of Forge and its forks, in one place, imported lazily (as host.py is for A1111).

Every fork keeps the loaded checkpoint's parts in `shared.sd_model.forge_objects` (unet, clip, vae),
ComfyUI style: `unet` is a model patcher whose `.model.diffusion_model` is an LDM-named UNet, `clip`
holds `clip_l`/`clip_h`/`clip_g` text models, and weights are loaded (and LoRAs merged) under
`torch.inference_mode()`. Two lineages differ underneath:

- "backend": lllyasviel's Forge (2.x) and Forge Neo. `backend/` has its own patcher, a `KModel` in
  sigma space, `backend.memory_management`, layers built from `backend.operations` (whose Linear is an
  nn.Module, not an nn.Linear) and a text-processing engine per encoder (`text_processing_engine*`).
- "ldm_patched": reForge and Forge Classic. `ldm_patched` is a port of ComfyUI, and `sd_model` is
  still A1111's ldm/sgm model whose UNet and CLIP *are* the forge objects' modules.

Functions here answer: which fork is this, can this model be trained in place with the fork's memory
settings (`refusal`, `load_for_training`), and how do we take the last generation's LoRA off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass

LEGACY_FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class ForgeFork:
    name: str  # shown in messages: "Forge", "Forge Neo", "reForge", "Forge Classic"
    lineage: str  # "backend" | "ldm_patched"
    version: str = ""


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def fork() -> ForgeFork:
    """Which Forge this is, from the modules it ships (Neo adds model families stock Forge lacks)."""
    version = ""
    try:
        from modules_forge import forge_version

        version = str(getattr(forge_version, "version", ""))
    except ImportError:
        pass
    if _has("backend.memory_management"):
        neo = any(_has(m) for m in ("backend.diffusion_engine.zimage", "backend.diffusion_engine.wan",
                                    "backend.diffusion_engine.qwen"))
        return ForgeFork("Forge Neo" if neo else "Forge", "backend", version)
    name = "Forge Classic" if version == "classic" else "reForge"  # Classic's forge_version says "classic"
    return ForgeFork(name, "ldm_patched", version)


def memory(lineage: str):
    """The fork's model manager (`load_models_gpu`, `current_loaded_models`, `vram_state`)."""
    if lineage == "backend":
        from backend import memory_management

        return memory_management
    from ldm_patched.modules import model_management

    return model_management


def loaded_model():
    """The model Forge has loaded; Forge loads a checkpoint lazily, on the first generation."""
    from modules import sd_models, shared

    model = shared.sd_model
    if getattr(model, "forge_objects", None) is None and hasattr(sd_models, "forge_model_reload"):
        sd_models.forge_model_reload()
        model = shared.sd_model
    return model


def family(sd_model) -> str | None:
    """"sd1" | "sd2" | "sdxl", or None for a family this trainer does not train (Flux, SD3, ...)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    return None


def _unet(sd_model):
    return sd_model.forge_objects.unet.model.diffusion_model


def refusal(sd_model, *, train_text_encoder: bool) -> str | None:
    """Why the loaded model cannot be trained in place on this fork (None: it can)."""
    which = fork()
    objects = getattr(sd_model, "forge_objects", None)
    if objects is None or getattr(objects, "unet", None) is None:
        return None  # not loaded yet (Forge loads lazily): the job loads it and asks again
    kind = family(sd_model)
    if kind is None or getattr(sd_model, "is_sd3", False):
        return (f"{which.name} has a {type(sd_model).__name__} model loaded; in-place training supports SD1.x, "
                f"SD2.x and SDXL checkpoints (Flux, SD3, Chroma and the other DiT families are not trained "
                f"here yet). Load one of those to train.")
    if kind == "sdxl" and (getattr(sd_model, "is_sdxl_refiner", False) or "Refiner" in type(sd_model).__name__):
        return "the SDXL refiner cannot be trained here (it has one text encoder); load an SDXL base model."
    if getattr(sd_model, "is_ssd", False):
        return "SSD-1B (a distilled SDXL) cannot be trained here yet; SD1.x, SD2.x and SDXL can."
    if int(getattr(_unet(sd_model), "in_channels", 4) or 4) != 4:
        return "inpainting checkpoints cannot be trained here; load the matching non-inpainting checkpoint."
    storage = getattr(sd_model.forge_objects.unet.model, "storage_dtype", None)
    if storage is not None and str(storage) not in ("torch.float32", "torch.float16", "torch.bfloat16"):
        return (f"the UNet is stored as {storage} (quantized: NF4/FP4/GGUF/FP8), which cannot be trained "
                f"here; set Diffusion in Low Bits to Automatic and reload the checkpoint.")
    mm = memory(which.lineage)
    vram = getattr(getattr(mm, "vram_state", None), "name", "")
    if vram in ("LOW_VRAM", "NO_VRAM") or getattr(mm, "ALWAYS_VRAM_OFFLOAD", False):
        return (f"{which.name} runs in a low-VRAM mode ({vram or 'always offload'}) that moves UNet blocks "
                f"between CPU and GPU inside every step, which breaks the backward pass; restart it without "
                f"--always-low-vram / --always-no-vram / --always-offload-from-vram (or --lowvram/--novram).")
    return None


def load_for_training(sd_model, *, with_text_encoder: bool) -> None:
    """Load UNet, CLIP and VAE whole onto the compute device, the fork's way, without the last
    generation's LoRA; refuse if the fork kept part of the UNet in CPU memory (it would move weights
    inside each step)."""
    which = fork()
    objects = sd_model.forge_objects
    mm = memory(which.lineage)
    patchers = [objects.unet, objects.clip.patcher, objects.vae.patcher]
    load = mm.load_models_gpu
    if "force_full_load" in inspect.signature(load).parameters:
        load(patchers, force_full_load=True)
    else:
        load(patchers)
    for entry in list(getattr(mm, "current_loaded_models", [])):
        patcher = getattr(entry, "model", None)
        if patcher is not objects.unet and not (with_text_encoder and patcher is objects.clip.patcher):
            continue
        if _partly_loaded(entry, patcher):
            from engine.errors import ModelError

            raise ModelError(f"{which.name} could only load part of the model onto the GPU (not enough free "
                             f"VRAM), so it would move weights inside every step, which breaks the backward "
                             f"pass; close other programs using the GPU, lower the GPU Weights slider, or "
                             f"untick 'Train text encoder'.")


def _partly_loaded(entry, patcher) -> bool:
    if getattr(entry, "model_accelerated", False) or getattr(getattr(patcher, "model", None), "model_lowvram", False):
        return True
    size, loaded = getattr(patcher, "model_size", None), getattr(patcher, "loaded_size", None)
    return callable(size) and callable(loaded) and 0 < loaded() < size()


def unmerge_loras(sd_model) -> list[str]:
    """Go back to the checkpoint's own patchers (no LoRA patches) and forget the cached LoRA state, so
    training starts from the base weights and the next `<lora:...>` prompt applies files afresh."""
    import torch

    names: list[str] = []
    networks = _networks()
    if networks is not None:
        names = [getattr(n, "name", str(n)) for n in getattr(networks, "loaded_networks", [])]
        cache = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
    original = getattr(sd_model, "forge_objects_original", None)
    if original is not None:
        sd_model.forge_objects = original.shallow_copy()
        sd_model.forge_objects_after_applying_lora = original.shallow_copy()
    sd_model.current_lora_hash = str([])
    with torch.inference_mode():
        for patcher in (sd_model.forge_objects.unet, getattr(sd_model.forge_objects.clip, "patcher", None)):
            refresh = getattr(patcher, "refresh_loras", None)  # backend: LoraLoader restores its backups
            if callable(refresh):
                refresh()
    return names


def _networks():
    try:
        import networks  # the fork's built-in Lora extension (sd_forge_lora / Lora)

        return networks if hasattr(networks, "load_networks") else None
    except ImportError:
        return None


@contextlib.contextmanager
def no_emphasis():
    """Captions are literal: the prompt parser would read `(word:1.2)` as a weight."""
    from modules import shared

    from .adapter import temporary_option

    with temporary_option(shared.opts, "emphasis", "None"):
        yield
