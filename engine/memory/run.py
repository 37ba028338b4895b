"""The estimate for a config and its dataset: before loading (`engine check`, a host's dataset report)
and at a run's start (the trainer's start message), from the same `RunShape`."""

from __future__ import annotations

from pathlib import Path

from .advice import Advice, advise, free_memory
from .estimate import RunShape, weights_of_family, weights_of_model
from .families import family_memory


def largest_latent_pixels(data, latent_factor: int = 8) -> int:
    """Latent pixels of the dataset's largest bucket (the steps that set the peak)."""
    buckets = {p.bucket for p in getattr(data, "placements", [])}
    if not buckets:
        w, h = data.resolution
        buckets = {(w, h)}
    return max(w * h for w, h in buckets) // (latent_factor * latent_factor)


def shape_of(cfg, data, family: str, precision: str, *, train_text_encoder: bool | None = None) -> RunShape:
    fam = family_memory(family)
    return RunShape(family=family, batch_size=cfg.batch_size,
                    latent_pixels=largest_latent_pixels(data, fam.latent_factor if fam else 8),
                    precision=precision, gradient_checkpointing=cfg.gradient_checkpointing,
                    cache_latents=bool(getattr(data, "latent_cache_mode", None)),
                    cache_text=bool(getattr(data, "text_cache_enabled", False)),
                    train_text_encoder=cfg.train_text_encoder if train_text_encoder is None else train_text_encoder,
                    optimizer=cfg.optimizer, token_windows=max(1, cfg.max_token_length // 75),
                    fp8_compute=cfg.fp8_compute, cpu_offload_checkpointing=cfg.cpu_offload_checkpointing)


def advice_before_loading(cfg, data) -> Advice | None:
    """For `engine check`: the family from the base model's header (no tensors read), the full-size
    model's weights, the device the run would use. None when the family cannot be told."""
    import torch

    from ..models.detect import detect_path
    from ..runtime import resolve_device, resolve_precision

    if not cfg.base_model or not Path(cfg.base_model).expanduser().exists():
        return None
    try:
        family = detect_path(Path(cfg.base_model).expanduser()).family
    except Exception:  # the run itself reports an unreadable model, with its own advice
        return None
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.mixed_precision, device)
    weights = weights_of_family(family, precision=precision, fp8_base=cfg.fp8_base, rank=cfg.lora_rank)
    if weights is None:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return advise(shape_of(cfg, data, family, precision), weights, free_memory(device), device_name=name)


def advice_at_start(trainer) -> Advice | None:
    """For the trainer's start message: the loaded model as it is on the device now (encoders parked,
    fp8 storage, the host's dtypes, fp8_compute's copy); what of it is loaded already does not count
    against free memory."""
    model = trainer.model
    train_te = bool(trainer.network.text_encoder_parameters()) and not trainer.frozen_te
    shape = shape_of(trainer.cfg, trainer.data, model.info.family, trainer.precision, train_text_encoder=train_te)
    free = free_memory(model.device)
    if free is None:  # CPU/MPS: no device budget to compare with
        return None
    weights = weights_of_model(model, trainer.network)
    est_weights = weights.denoiser + (weights.text_encoders if shape.text_on_device else 0) + (
        0 if shape.cache_latents else weights.vae) + (weights.fp8_copy if shape.fp8_compute else 0)  # made already
    return advise(shape, weights, free, already=est_weights, device_name=str(model.device))


def memory_note(trainer) -> str:
    """"; memory: needs about ..." for the start message ("" where no estimate can be made). Keeps the
    advice on the trainer (`memory_advice`) for an out-of-memory that no recovery plan fixes."""
    try:
        advice = advice_at_start(trainer)
    except Exception as exc:  # an estimate is advice: it never stops a run
        import logging

        logging.getLogger(__name__).debug("no memory estimate: %s", exc)
        advice = None
    trainer.memory_advice = advice
    return f"; memory: {advice.text}" if advice is not None else ""
