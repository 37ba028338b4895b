"""The out-of-memory recovery's last plan: cache on the CPU what the run encodes every step, and move the
encoders off the device.

A run that does not cache (`cache_latents: off`, `cache_text_encoder_outputs: off`) keeps the VAE and
the text encoders on the GPU and runs them in every step, on top of the denoiser's activations. This
plan encodes the training images' latents and the captions' conditioning once, keeps them in CPU
memory (as `cache_latents: memory` and the text cache do), parks the encoders the step no longer calls
in CPU memory (engine/encoder_parking.py) and trains the failed step again with the same images and
the same noise. The plan must not need more memory than the step it replaces: the failed step is freed
first (recovery.py), the captions are encoded and their encoders parked before the VAE runs, no VAE
call takes more images than the micro-batch the step trained (the SDXL VAE's attention needs about
0.5 GiB per 1024 px image), and a call that still runs out of memory is encoded again one item at a
time. Captions go to the text encoders as many to a call as when a run caches them at its start, with
the same models on the device (`TEXT_CALL`): an inference call over text is small next to the VAE's
and to the training step that was freed, so cutting it to the micro-batch would cost calls, not memory.

What cannot be cached is left as it is, and said: latents when `random_crop` or `color_jitter` change
the pixels every step (their latents differ each time; caching one would change what the run trains
on), text when the text encoder is trained or the captions change every step (`shuffle_caption`,
`caption_tag_dropout_rate`). When nothing can be cached the plan is not offered. On a GPU, a latent
encoded in the step ran under the run's autocast, a cached one is the VAE's own precision (what
`cache_latents` gives from the start): the change is noted with the plan in the log and the metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..data.augment import per_step_pixel_changes
from ..data.cache import LatentStore
from ..data.train_data import TEXT_CALL
from ..data.text import per_step_caption_change
from .release import release

logger = logging.getLogger(__name__)

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


def apply(trainer, chunk: int) -> str:
    """Cache what `choose` says, park the encoders no longer called; returns what changed, for the
    log and the metadata. `chunk`: the micro-batch the step trains now, the most images one VAE call
    takes (a plan that exists to save memory must not need more than the step did).
    The captions go first, so their encoders are parked before the VAE runs."""
    choice = choose(trainer)
    model, cfg = trainer.model, trainer.cfg
    sets = [trainer.data] + [d for d in [getattr(trainer, "val_data", None)] if d is not None]
    parking = getattr(trainer, "parking", None)
    retried: list[int] = []
    for kind in ("text", "latents"):
        for data in sets:
            own = getattr(data, "_data", data)  # one process's own data: no collective call inside a step
            if kind == "latents" and choice.latents and own.latent_cache_mode is None:
                # the store first: a prefetch thread that sees the mode finds the store the cache fills
                own._store = LatentStore("memory")
                own.latent_cache_mode = "memory"
            if kind == "text" and choice.text:
                own.text_cache_enabled = True
            jobs = [job for job in own.cache_jobs(chunk) if job[0] == kind]
            retried += run_jobs(own, model, jobs, trainer.device)
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
    n, what_per, call = ((min(cfg.vae_batch_size, chunk), "image", "VAE") if choice.latents else
                         (TEXT_CALL, "caption", "text encoder"))
    text += f"; encoded at most {n} {what_per}{'s' if n > 1 else ''} per {call} call"
    if retried:
        text += (f" (out of memory at {max(retried)} per call: {len(retried)} call{'s' if len(retried) > 1 else ''} "
                 f"encoded again one at a time)")
    if choice.not_cached:
        text += f"; not cached: {'; '.join(choice.not_cached)}"
    return text


def run_jobs(own, model, jobs: list[tuple[str, list]], device) -> list[int]:
    """`own.run_cache_jobs` one job at a time; a job of several items that runs out of memory is freed
    and run again one item at a time (an out-of-memory error then goes to the caller). Returns the
    sizes of the jobs that had to be run again."""
    retried = []
    for kind, items in jobs:
        try:
            own.run_cache_jobs(model, [(kind, items)])
            continue
        except torch.cuda.OutOfMemoryError as exc:
            if len(items) == 1:
                raise
            exc.__traceback__ = None  # its frames hold the failed call's activations
        release(device)
        logger.info("out of memory encoding %d %s in one call; encoding them one at a time", len(items), kind)
        retried.append(len(items))
        for item in items:
            own.run_cache_jobs(model, [(kind, [item])])
    return retried
