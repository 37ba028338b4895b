"""What a run trains on: the model (a host's, or one loaded from `base_model`) and its dataset.

The dataset comes first where the model is loaded from disk, so a wrong folder is reported before a
7 GB model load. The precision is resolved for the model's device, and `fp8_base` is applied to a
model the engine loaded itself (never to a host's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data.cache import weights_digest
from .data.shards import ShardedData
from .errors import ConfigError
from .families import FamilySpec, get_family
from .family_checks import check_family_options
from .model import TrainableModel
from .runtime import compute_dtype, resolve_device, resolve_precision


@dataclass
class RunInputs:
    model: TrainableModel
    data: Any  # TrainData, or ShardedData over it with several GPUs
    precision: str


def load_inputs(cfg: TrainConfig, model: TrainableModel | None, data, dist, events) -> RunInputs:
    """The model and dataset of a run (`data` given: a prepared dataset, e.g. from a host node)."""
    cfg.check_paths(need_base_model=model is None)
    if model is None:
        return _load_from_disk(cfg, data, dist, events)
    if cfg.fp8_base:
        raise ConfigError("fp8_base converts the weights of a base_model the engine loads itself; this "
                          "model comes from the host, whose weights the trainer never changes. Turn "
                          "fp8_base off (in ComfyUI, load the UNet in fp8 with Load Diffusion Model, "
                          "weight_dtype fp8_e4m3fn, and train that MODEL as it is).")
    check_family_options(cfg, model.info.spec)
    precision = resolve_precision(cfg.mixed_precision, model.device)
    if cfg.prediction_type != "auto":
        model.info.prediction_type = cfg.prediction_type
    if data is None:
        data = _dataset(cfg, dist, model.info.resolution, model_key(model), model.info.spec)
    return RunInputs(model, data, precision)


def _load_from_disk(cfg: TrainConfig, data, dist, events) -> RunInputs:
    from .models.demo_model import IMAGE_SIZE as DEMO_SIZE, demo_model, is_demo_model_file
    from .models.detect import detect_path
    from .models.load import load_base_model
    from .models.module_state import require_xformers

    if cfg.attention == "xformers":
        require_xformers()  # before the dataset scan and the model load: says what to install
    path = Path(cfg.base_model).expanduser()
    demo = is_demo_model_file(path)
    if demo:
        family, native = "sd1", DEMO_SIZE
    else:
        from .models.flux_sources import is_flux_source

        if is_flux_source(path):  # Flux.1: a transformer file (+ ae / clip_l / t5xxl), all-in-one, or diffusers
            from .flux_inputs import load_flux_inputs

            return load_flux_inputs(cfg, path, data, dist, events)
        found = detect_path(path)  # refuses other families and broken files
        v_hint = found.v_pred_marker or found.scheduler_prediction_type == "v_prediction"
        family = found.family
        native = get_family(family).native_resolution("v_prediction" if v_hint else "epsilon")
    spec = get_family(family)
    if data is None:
        data = _dataset(cfg, dist, native, _file_key(family, path), spec)
    device = dist.device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.mixed_precision, device)
    if cfg.fp8_base and precision not in ("bf16", "fp16"):
        raise ConfigError(f"fp8_base computes each layer in bf16 or fp16; set mixed_precision: bf16 "
                          f"(on {device} '{cfg.mixed_precision}' means {precision}).")
    if demo:  # the built-in demo model (python -m engine demo) as a base_model
        model = demo_model(path, device=device, dtype=compute_dtype(precision), attention=cfg.attention,
                           clip_skip=cfg.clip_skip)
        model.info.resolution = native
        if cfg.prediction_type != "auto":
            model.info.prediction_type = cfg.prediction_type
    else:
        model = load_base_model(cfg.base_model, device=device, dtype=compute_dtype(precision),
                                prediction_type=cfg.prediction_type, clip_skip=cfg.clip_skip, attention=cfg.attention)
    if cfg.fp8_base:
        from .models.fp8 import store_in_fp8

        before, after = store_in_fp8(model.unet)
        events.emit("info", message=f"UNet Linear/Conv2d weights stored in fp8: "
                                    f"{before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
    if model.info.resolution != native and str(cfg.resolution) == "auto":
        # an SD2-768 model without a v marker: buckets at its real size
        data = _dataset(cfg, dist, model.info.resolution, model_key(model), spec)
    return RunInputs(model, data, precision)


def _dataset(cfg: TrainConfig, dist, native_resolution: int, key: str, spec: FamilySpec):
    from .data.train_data import TrainData

    data = TrainData(cfg, native_resolution=native_resolution, model_key=key,
                     train_text_encoder=cfg.train_text_encoder, max_bucket_reso=spec.max_bucket_reso)
    return ShardedData(data, dist) if dist.enabled else data


def model_key(model: TrainableModel) -> str:
    """Identifies the model for the disk latent cache: a changed model must not reuse latents.
    Latents depend on the VAE alone, so its weights key them where the adapter reaches them (a host's
    VAE may be swapped under the same checkpoint name: A1111's SD VAE setting, ComfyUI's VAE Loader)."""
    info = model.info
    vae = model.vae_module()
    if vae is not None:
        return f"{info.family}-vae-{weights_digest(vae)}"
    source = getattr(model, "source_path", None)
    if info.sha256:
        return f"{info.family}-{info.sha256[:16]}"
    if source and Path(source).exists():
        return _file_key(info.family, Path(source))
    return f"{info.family}-{info.name or 'model'}-{id(model)}"


def _file_key(family: str, path: Path) -> str:
    """A checkpoint file by name, size and modification time (a rewritten file gets a new key)."""
    stat = path.stat()
    return f"{family}-{path.name}-{stat.st_size}-{int(stat.st_mtime)}"
