"""A Flux.1 run's inputs from disk: the model at `base_model` (a BFL transformer with the config's ae /
clip_l / t5xxl files, an all-in-one checkpoint or a diffusers folder: engine/models/flux_sources.py),
`fp8_base` applied to its Linear weights, and the dataset at Flux's native 1024 px. Called by run_inputs
when `base_model` is a Flux file or folder."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .families import get_family
from .family_checks import check_family_options
from .runtime import compute_dtype, resolve_device, resolve_precision


def load_flux_inputs(cfg, path: Path, data, dist, events):
    from .models.flux_adapter import load_flux
    from .models.flux_sources import part_loaders
    from .run_inputs import RunInputs, _dataset, _file_key

    spec = get_family("flux1")
    check_family_options(cfg, spec)  # before the dataset scan and a 24 GB load
    part_loaders(cfg, path)  # every part found (nothing loaded yet), or a message naming the missing ones
    if data is None:
        data = _dataset(cfg, dist, spec.resolution, _file_key("flux1", path), spec)
    device = dist.device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.mixed_precision, device)
    if cfg.fp8_base and precision not in ("bf16", "fp16"):
        raise ConfigError(f"fp8_base computes each layer in bf16 or fp16; set mixed_precision: bf16 "
                          f"(on {device} '{cfg.mixed_precision}' means {precision}).")
    model = load_flux(cfg, path, device=device, dtype=compute_dtype(precision))
    if cfg.fp8_base:
        from .models.fp8 import store_in_fp8

        before, after = store_in_fp8(model.transformer)
        events.emit("info", message=f"Flux Linear weights stored in fp8: {before / 2**30:.2f} GiB -> "
                                    f"{after / 2**30:.2f} GiB")
    return RunInputs(model, data, precision)
