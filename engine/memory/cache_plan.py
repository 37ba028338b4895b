"""The out-of-memory recovery's last plan: cache on the CPU what the run encodes every step, and move the
encoders off the device.

A run that does not cache (`cache_latents: off`, `cache_text_encoder_outputs: off`) keeps the VAE and
the text encoders on the GPU and runs them in every step, on top of the denoiser's activations. This
plan encodes the training images' latents and the captions' conditioning once, keeps them in CPU
memory (as `cache_latents: memory` and the text cache do), parks the encoders the step no longer calls
in CPU memory (engine/encoder_parking.py) and trains the failed step again with the same images and
the same noise.

What cannot be cached is left as it is, and said: latents when `random_crop` or `color_jitter` change
the pixels every step (their latents differ each time; caching one would change what the run trains
on), text when the text encoder is trained or the captions change every step (`shuffle_caption`,
`caption_tag_dropout_rate`). When nothing can be cached the plan is not offered. On a GPU, a latent
encoded in the step ran under the run's autocast, a cached one is the VAE's own precision (what
`cache_latents` gives from the start): the change is noted with the plan in the log and the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.augment import per_step_pixel_changes
from ..data.cache import LatentStore
from ..data.text import per_step_caption_change

CACHE = "cache_on_cpu"


@dataclass
class CacheChoice:
    latents: bool = False  # latents not cached yet that can be
    text: bool = False  # text conditioning not cached yet that can be
    not_cached: list[str] = field(default_factory=list)  # what stays encoded every step, and why

    @property
    def any(self) -> bool:
        return self.latents or self.text


def choose(trainer) -> CacheChoice:
    """What this plan would cache for the run as it is now."""
    data, cfg = trainer.data, trainer.cfg
    choice = CacheChoice()
    if not hasattr(data, "cache_jobs"):  # a data pipeline without encoder caches: nothing to offer
        return choice
    if data.latent_cache_mode is None:
        changing = per_step_pixel_changes(cfg)
        choice.latents = not changing
        if changing:
            verb = "change" if len(changing) > 1 else "changes"
            choice.not_cached.append(f"latents: {' and '.join(changing)} {verb} the pixels every step")
    if not data.text_cache_enabled:
        why = per_step_caption_change(cfg, train_text_encoder(trainer))
        choice.text = not why
        if why:
            choice.not_cached.append(f"text conditioning: {why}")
    return choice


def train_text_encoder(trainer) -> bool:
    return bool(trainer.network.text_encoder_parameters()) and not trainer.frozen_te


def apply(trainer) -> str:
    """Cache what `choose` says, park the encoders no longer called; returns what changed, for the
    log and the metadata."""
    choice = choose(trainer)
    model, cfg = trainer.model, trainer.cfg
    sets = [trainer.data] + [d for d in [getattr(trainer, "val_data", None)] if d is not None]
    for data in sets:
        own = getattr(data, "_data", data)  # one process's own data: no collective call inside a step
        if choice.latents and own.latent_cache_mode is None:
            # the store first: a prefetch thread that sees the mode finds the store the cache fills
            own._store = LatentStore("memory")
            own.latent_cache_mode = "memory"
        if choice.text:
            own.text_cache_enabled = True
        own.run_cache_jobs(model, own.cache_jobs())
    parking = getattr(trainer, "parking", None)
    if parking is not None:
        parking.follow(model, trainer.data, cfg.train_text_encoder)
    what = [name for name, on in (("latents", choice.latents), ("text conditioning", choice.text)) if on]
    encoders = [name for name, on in (("the VAE", choice.latents), ("the text encoders", choice.text)) if on]
    cuda = trainer.device.type == "cuda"
    text = (f"{' and '.join(what)} cached in CPU memory, {' and '.join(encoders)} no longer run in the step"
            + (" (moved to the CPU)" if cuda else ""))
    changed = []
    if choice.latents and cuda and trainer.data.step_encode_precision != "no":
        changed.append(f"latents from the VAE at its own precision, not under "
                       f"{trainer.data.step_encode_precision} autocast")
    if choice.text and cuda and trainer.precision != "no" and trainer.use_autocast:
        changed.append(f"text conditioning at the encoders' own precision, not under {trainer.precision} autocast")
    if changed:  # what a run that caches from the start computes
        text += f"; numbers change slightly: {', '.join(changed)}"
    if choice.not_cached:
        text += f"; not cached: {'; '.join(choice.not_cached)}"
    return text
