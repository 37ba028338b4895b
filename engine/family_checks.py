"""Options that do not fit the model's family, refused before anything is loaded or trained.

SD-only settings on a flow model (clip_skip, a prediction type, pyramid noise) would silently do nothing, and a Flux.1
size that is not a multiple of 16 px cannot be cut into its 2x2 latent patches: each gets a message that
says what to set instead.
"""

from __future__ import annotations

from .errors import ConfigError
from .families import FamilySpec

PATCH_PX = 16  # Flux.1: 8x VAE downscale and 2x2 patches


def check_family_options(cfg, spec: FamilySpec) -> None:
    if spec.objective != "flow":
        return
    name = spec.display_name
    if cfg.clip_skip:
        raise ConfigError(f"clip_skip is an SD setting: {name} reads CLIP-L's pooled output and T5's last layer. "
                          f"Set clip_skip to 0 (remove it from the config).")
    if cfg.prediction_type != "auto":
        raise ConfigError(f"prediction_type {cfg.prediction_type} is an SD setting: {name} is a rectified-flow "
                          f"model that predicts velocity. Set prediction_type to auto; timestep_sampling and "
                          f"weighting_scheme shape a flow run.")
    if cfg.multires_noise_iterations:
        raise ConfigError(f"multires_noise_iterations is an SD setting: pyramid noise shapes DDPM's noise, and "
                          f"kohya does not apply it to flow models either. Set it to 0; ip_noise_gamma (about "
                          f"0.1) is the noise regulariser that applies to {name}.")
    w, h = cfg.resolution_wh(spec.resolution)
    if w % PATCH_PX or h % PATCH_PX:
        raise ConfigError(f"resolution {w}x{h}: {name} needs sides that are multiples of {PATCH_PX} px (its latents "
                          f"are cut into 2x2 patches of the VAE's 8x grid). Use e.g. 1024, 768 or 512.")
    if cfg.enable_bucket and cfg.bucket_reso_steps % PATCH_PX:
        raise ConfigError(f"bucket_reso_steps {cfg.bucket_reso_steps}: {name} buckets must be multiples of "
                          f"{PATCH_PX} px; use 64 (the default) or 32 as kohya does for Flux.")
