"""TrainData: from the config's folders to batches of latents + captions the loop trains on.

It scans the train and regularisation folders once (records.py), places every image in a bucket
(buckets.py), fixes the epoch's sample multiset (plan.py), decides what can be cached, fills the
caches in batched encoder calls (`prepare_cache`) and turns a BatchPlan into a Batch on the model's
device (`materialize`). Every random choice is seeded by (seed, epoch, slot): resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..config import TrainConfig
from ..errors import DatasetError
from ..model import Conditioning, TrainableModel
from ..runtime import autocast
from .augment import color_jitter, flip_where, jitter_params, per_step_pixel_changes
from .buckets import BucketAssigner, Placement
from .latent_check import bad_samples, encode_checked
from .cache import CachedLatent, LatentStore, TextCache, file_digest
from .images import load_image
from .masks import MaskSource, to_latent_size
from .plan import BatchPlan, Sample, build_samples, count_batches, epoch_batches
from .records import ImageRecord, Subset, scan_dataset
from .validation_split import held_out
from .text import (fixed_caption, per_step_caption_change, process_caption, sample_rng, split_tags, tag_frequency,
                   with_trigger)

TEXT_CALL = 16  # captions per text-encoder call when caching (whatever the VAE's batch is)
CACHE_DIR_NAME = ".lora_cache"  # hidden, so dataset scans never mistake it for a subset
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Resampling


@dataclass
class Batch:
    latents: torch.Tensor  # [B,C,h,w] on model.device, float32
    captions: list[str]  # processed captions (after trigger/shuffle/dropout)
    cond: Conditioning | None  # from the text cache when valid, else None (the loop encodes captions)
    time_ids: torch.Tensor  # [B,6] float: orig_h, orig_w, crop_top, crop_left, target_h, target_w
    loss_weights: torch.Tensor  # [B]: 1.0, or prior_loss_weight for regularisation images
    share: object = None  # several processes: the shards.Share of the global batch these samples are
    masks: torch.Tensor | None = None  # [B,1,h,w] loss masks at the latents' size (masked_loss), else None


@dataclass
class HostBatch:
    """What `gather` prepares on the host for `to_device` (see there)."""
    latents: list  # cached latent per sample, None where it must be encoded
    flips: list[bool] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    time_ids: list[list[int]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # batch positions to encode
    records: list[int] = field(default_factory=list)  # their record indices
    pixels: torch.Tensor | None = None  # [len(missing), 3, h, w] in [0, 1], cropped, before flip/jitter
    jitter: list | None = None
    share: object = None  # the plan's shards.Share (several processes)
    masks: list = field(default_factory=list)  # [1, H, W] pixel loss masks per sample (masked_loss)


def _dropout_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """kohya's caption_dropout_every_n_epochs: every N-th epoch (counted from 1) trains on empty captions."""
    n = cfg.caption_dropout_every_n_epochs
    return n > 0 and (epoch + 1) % n == 0


class TrainData:
    def __init__(self, cfg: TrainConfig, *, native_resolution: int, model_key: str, train_text_encoder: bool,
                 max_bucket_reso: int | None = None, only: set[Path] | None = None):
        """`only`: keep just these images (the validation images held out of a dataset, validation.py)."""
        self.cfg = cfg
        self.model_key = model_key
        self.warnings: list[str] = []
        if not cfg.train_data_dir:
            raise DatasetError("train_data_dir is not set: point it at your folder of training images.")
        train = scan_dataset(cfg.train_data_dir, repeats=cfg.repeats, caption_extension=cfg.caption_extension,
                             metadata_path=cfg.metadata_path, min_image_size=cfg.min_image_size,
                             token_limit=cfg.max_token_length)
        self.warnings += train.warnings
        self.subsets: list[Subset] = list(train.subsets)
        if cfg.reg_data_dir:
            reg = scan_dataset(cfg.reg_data_dir, repeats=1, caption_extension=cfg.caption_extension,
                               min_image_size=cfg.min_image_size, is_reg=True, token_limit=cfg.max_token_length)
            self.warnings += [f"Regularisation images: {w}" for w in reg.warnings]
            self.subsets += reg.subsets
        self.records: list[ImageRecord] = [r for s in self.subsets for r in s.records]
        # validation_split: a fraction of the training images is held out for the validation loss
        self.held_out = held_out(self.records, cfg) if only is None else set()
        if only is not None or self.held_out:
            self.records = [r for r in self.records if (r.path in only if only is not None else r.path not in self.held_out)]

        self.resolution = cfg.resolution_wh(native_resolution)
        max_size = cfg.max_bucket_reso
        if max_size == 1024:  # the default: the family's (FamilySpec.max_bucket_reso; SDXL: 2048)
            max_size = max_bucket_reso or (2048 if native_resolution >= 1024 else 1024)
        self.buckets = BucketAssigner(self.resolution, enable=cfg.enable_bucket, min_size=cfg.min_bucket_reso,
                                      max_size=max_size, steps=cfg.bucket_reso_steps,
                                      no_upscale=cfg.bucket_no_upscale)
        self.placements: list[Placement] = [self.buckets.place(r.width, r.height) for r in self.records]

        train_ids = [(i, r.repeats) for i, r in enumerate(self.records) if not r.is_reg]
        reg_ids = [(i, r.repeats) for i, r in enumerate(self.records) if r.is_reg]
        self.samples: list[Sample] = build_samples(train_ids, reg_ids, cfg.seed)
        self.num_train_images = sum(n for _, n in train_ids)  # kohya's count: images x repeats
        self.num_reg_images = sum(n for _, n in reg_ids)
        self._used = sorted({s.record for s in self.samples})

        self.latent_cache_mode = self._latent_mode()
        # latents encoded during training (not cached) run under autocast in this precision on CUDA; the
        # trainer sets "bf16" when it trains in bf16 (bf16 has fp32's range: no fp16 VAE overflow)
        self.step_encode_precision = "no"
        self.reencoded = 0  # images whose latents the VAE gave NaN/black in half precision, encoded again in fp32
        self.text_cache_enabled = self._text_cache_ok(train_text_encoder)
        self._store: LatentStore | None = None
        self._text = TextCache()
        self._digests: dict[int, str] = {}  # self.warnings are shown by the host, once (not logged here)
        self.masks = MaskSource(cfg.alpha_mask, cfg.conditioning_data_dir) if cfg.masked_loss or cfg.alpha_mask else None
        if self.masks is not None and not self.masks.count([self.records[i].path for i in self._used]):
            self.warnings.append("masked_loss is on but no image has a mask (<image>_mask.png beside it, or an "
                                 "alpha channel with alpha_mask): every pixel trains.")

    # --- decisions -------------------------------------------------------------------------------
    def _latent_mode(self) -> str | None:
        cfg = self.cfg
        mode = cfg.cache_latents
        if mode == "off":
            return None
        changing = per_step_pixel_changes(cfg)
        if changing:
            if mode != "auto":
                self.warnings.append(f"cache_latents: {mode} is ignored because {' and '.join(changing)} "
                                     f"change the pixels every step; latents are encoded each step instead.")
            return None
        return "memory" if mode == "auto" else mode

    def _text_cache_ok(self, train_text_encoder: bool) -> bool:
        mode = self.cfg.cache_text_encoder_outputs
        if mode == "off":
            return False
        why = per_step_caption_change(self.cfg, train_text_encoder)
        if why and mode == "on":
            self.warnings.append(f"cache_text_encoder_outputs: on is ignored because {why}.")
        return not why

    # --- sizes and metadata ------------------------------------------------------------------------
    def _bucket_of(self, record: int) -> tuple[int, int]:
        return self.placements[record].bucket

    def batches_per_epoch(self, batch_size: int | None = None) -> int:
        """`batch_size`: the global batch of several processes (engine/data/shards.py); default the config's."""
        return count_batches(self.samples, self._bucket_of, batch_size or self.cfg.batch_size)

    def epoch_plan(self, epoch: int, batch_size: int | None = None) -> list[BatchPlan]:
        return epoch_batches(self.samples, self._bucket_of, batch_size or self.cfg.batch_size, self.cfg.seed, epoch)

    def summary(self) -> dict:
        counts: dict[tuple[int, int], int] = {}
        for s in self.samples:
            counts[self._bucket_of(s.record)] = counts.get(self._bucket_of(s.record), 0) + 1
        errors = [abs(p.bucket[0] / p.bucket[1] - r.width / r.height) for r, p in zip(self.records, self.placements)]
        dirs = lambda reg: {s.name: {"n_repeats": s.repeats, "img_count": len(s.records)}  # noqa: E731
                            for s in self.subsets if s.is_reg == reg}
        return {
            "dataset_dirs": dirs(False),
            "reg_dataset_dirs": dirs(True),
            # the trigger word counts as a tag: A1111's card lists ss_tag_frequency as the training tags
            "tag_frequency": {s.name: tag_frequency([", ".join(with_trigger(split_tags(r.caption), self.cfg.trigger_word))
                                                     for r in s.records])
                              for s in self.subsets if not s.is_reg},
            "bucket_info": {"buckets": {i: {"resolution": b, "count": n} for i, (b, n) in
                                        enumerate(sorted(counts.items()))},
                            "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0},
            "resolution": self.resolution,
        }

    # --- caches --------------------------------------------------------------------------------------
    def _digest(self, record: int) -> str:
        if record not in self._digests:
            self._digests[record] = file_digest(self.records[record].path)
        return self._digests[record]

    def _latent_key(self, record: int) -> str:
        p = self.placements[record]
        return LatentStore.make_key(self._digest(record), self.model_key, p.bucket, p.resized, p.centre_crop())

    def reads_per_step(self) -> bool:
        """True when batches need more than memory lookups (images decoded, or disk-cached latents)."""
        return self.latent_cache_mode != "memory"

    def cache_dir(self) -> Path:
        """Where disk latents go: `cache_dir` if the config has one, else `<train_data_dir>/.lora_cache`."""
        configured = self.cfg.cache_dir
        return Path(configured).expanduser() if configured else Path(self.cfg.train_data_dir) / CACHE_DIR_NAME

    def _open_store(self) -> LatentStore:
        if self._store is None:
            folder = None
            if self.latent_cache_mode == "disk":
                folder = self.cache_dir()
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    fallback = Path(self.cfg.output_dir) / CACHE_DIR_NAME
                    self.warnings.append(f"Cannot write the latent cache to '{folder}' ({exc}); using "
                                         f"'{fallback}' instead.")
                    folder = fallback
            self._store = LatentStore(self.latent_cache_mode, folder)
        return self._store

    def cached_captions(self) -> list[str]:
        """Every caption a step can train on when captions are fixed ("" too, with caption dropout)."""
        caps = {fixed_caption(self.records[i].caption, trigger_word=self.cfg.trigger_word) for i in self._used}
        if self.cfg.caption_dropout > 0 or self.cfg.caption_dropout_every_n_epochs > 0:
            caps.add("")
        return sorted(caps)

    @torch.no_grad()
    def prepare_cache(self, model: TrainableModel, *, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode what can be cached, batching encoder calls; disk entries already present are reused."""
        self.run_cache_jobs(model, self.cache_jobs(), progress=progress)

    def cache_jobs(self, vae_chunk: int | None = None) -> list[tuple[str, list]]:
        """The encoder calls caching needs: ("latents", record ids of one bucket, at most vae_batch_size)
        and ("text", TEXT_CALL captions); `vae_chunk`: at most that many images per VAE call (the
        out-of-memory recovery's micro-batch). Captions are not chunked by it: a text-encoder call
        needs little memory next to the VAE's, and fewer captions a call only costs time."""
        jobs: list[tuple[str, list]] = []
        if self.latent_cache_mode:
            store = self._open_store()
            todo = [i for i in self._used if not store.has(self._latent_key(i), self.cfg.flip_aug)]
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for i in todo:
                by_bucket.setdefault(self.placements[i].bucket, []).append(i)
            size = min(self.cfg.vae_batch_size, vae_chunk or self.cfg.vae_batch_size)
            for ids in by_bucket.values():
                jobs += [("latents", ids[k:k + size]) for k in range(0, len(ids), size)]
        if self.text_cache_enabled:
            captions = [c for c in self.cached_captions() if c not in self._text]
            jobs += [("text", captions[k:k + TEXT_CALL]) for k in range(0, len(captions), TEXT_CALL)]
        return jobs

    @torch.no_grad()
    def run_cache_jobs(self, model: TrainableModel, jobs: list[tuple[str, list]], *,
                       progress: Callable[[int, int], None] | None = None) -> None:
        for n, (kind, items) in enumerate(jobs, 1):
            if kind == "latents":
                self._encode_into_cache(model, items)
            else:
                self._text.put_batch(items, model.encode_text(items))
            if progress is not None:
                progress(n, len(jobs))

    def cache_entries(self, jobs: list[tuple[str, list]]) -> dict:
        """What `jobs` put in the memory caches (disk latents are shared through the disk), for other processes."""
        memory = self.latent_cache_mode == "memory"
        latents = {self._latent_key(i): self._store.get(self._latent_key(i))
                   for kind, ids in jobs if kind == "latents" and memory for i in ids}
        text = [c for kind, items in jobs if kind == "text" for c in items]
        return {"latents": latents, "text": (text, self._text.batch(text, torch.device("cpu")) if text else None)}

    def add_cache_entries(self, entries: dict) -> None:
        """Another process's `cache_entries`."""
        for key, entry in entries["latents"].items():
            self._open_store().put(key, entry)
        captions, cond = entries["text"]
        if captions:
            self._text.put_batch(captions, cond)

    def _encode_into_cache(self, model: TrainableModel, ids: list[int]) -> None:
        crops = [self.placements[i].centre_crop() for i in ids]
        pixels = torch.stack([self._pixels(i, c) for i, c in zip(ids, crops)])
        # the flipped images in a VAE call of their own: `len(ids)` images per call (vae_batch_size)
        latents = self._encode(model, pixels, ids)
        flipped = self._encode(model, torch.flip(pixels, dims=[3]), ids) if self.cfg.flip_aug else None
        store = self._open_store()
        for k, i in enumerate(ids):
            entry = CachedLatent(latents[k], flipped[k] if flipped is not None else None)
            store.put(self._latent_key(i), entry, source=self.records[i].path.name)

    # --- batches ------------------------------------------------------------------------------------
    def _pixels(self, record: int, crop: tuple[int, int]) -> torch.Tensor:
        """[3, h, w] float32 in [0, 1]: resized to cover the bucket, then the crop window taken."""
        p = self.placements[record]
        img = load_image(self.records[record].path, at_least=p.resized)
        if img.size != p.resized:
            img = img.resize(p.resized, _LANCZOS)
        left, top = crop
        img = img.crop((left, top, left + p.bucket[0], top + p.bucket[1]))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def _encode(self, model: TrainableModel, pixels01: torch.Tensor, ids: list[int]) -> torch.Tensor:
        pixels = (pixels01.to(model.device) * 2 - 1)
        with torch.no_grad():
            latents, again = encode_checked(model, pixels)  # fp16 VAE overflow: those images again in fp32
        self.reencoded += again
        bad = [self.records[i].path for i, wrong in zip(ids, bad_samples(latents).tolist()) if wrong]
        if bad:
            raise DatasetError(
                f"The VAE produced NaN/inf or all-zero (black) latents for '{bad[0]}'"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}. This is the fp16 VAE overflowing "
                f"(common with SDXL): encode with an fp32 VAE (mixed_precision: no, or the VAE in full "
                f"precision / the fp16-fix VAE), or check that the image is not corrupt.")
        return latents

    def materialize(self, plan: BatchPlan, model: TrainableModel, *, epoch: int) -> Batch:
        return self.to_device(self.gather(plan, epoch=epoch), model)

    def gather(self, plan: BatchPlan, *, epoch: int) -> HostBatch:
        """The host half of a batch: cached latents looked up, captions processed, and the pixels of
        images without a cached latent decoded and cropped. No GPU work, so the loop can run it for
        the next batch in a thread while the GPU trains on this one (engine/data/prefetch.py)."""
        cfg = self.cfg
        store = self._open_store() if self.latent_cache_mode else None
        n = len(plan.samples)
        host = HostBatch(latents=[None] * n, share=plan.share)
        missing: list[tuple[int, tuple[int, int]]] = []
        for k, s in enumerate(plan.samples):
            rec, place = self.records[s.record], self.placements[s.record]
            flip = cfg.flip_aug and sample_rng(cfg.seed, epoch, s.slot, "flip").random() < 0.5
            crop = place.random_crop(sample_rng(cfg.seed, epoch, s.slot, "crop")) if cfg.random_crop \
                else place.centre_crop()
            entry = store.get(self._latent_key(s.record)) if store is not None else None
            if entry is not None and (not flip or entry.flipped is not None):
                host.latents[k] = entry.flipped if flip else entry.latent
            else:
                missing.append((k, crop))
            host.flips.append(flip)
            host.captions.append(process_caption(rec.caption, sample_rng(cfg.seed, epoch, s.slot, "caption"),
                                                 trigger_word=cfg.trigger_word, shuffle=cfg.shuffle_caption,
                                                 keep_tokens=cfg.keep_tokens, dropout=cfg.caption_dropout,
                                                 tag_dropout=cfg.caption_tag_dropout_rate,
                                                 drop_all=_dropout_epoch(cfg, epoch)))
            left = place.resized[0] - crop[0] - place.bucket[0] if flip else crop[0]
            host.time_ids.append([rec.height, rec.width, crop[1], left, place.bucket[1], place.bucket[0]])
            host.weights.append(cfg.prior_loss_weight if rec.is_reg else 1.0)
            if self.masks is not None:
                host.masks.append(self.masks.get(s.record, rec.path, place, crop, flip, keep=not cfg.random_crop))
        if missing:
            host.missing = [k for k, _ in missing]
            host.records = [plan.samples[k].record for k in host.missing]
            host.pixels = torch.stack([self._pixels(i, crop) for i, (_, crop) in zip(host.records, missing)])
            if torch.cuda.is_available():
                host.pixels = host.pixels.pin_memory()
            if cfg.color_jitter > 0:
                host.jitter = [jitter_params(sample_rng(cfg.seed, epoch, plan.samples[k].slot, "jitter"),
                                             cfg.color_jitter) for k in host.missing]
        return host

    def to_device(self, host: HostBatch, model: TrainableModel) -> Batch:
        """The device half: encode the missing latents (with the augmentations) and move everything."""
        latents = list(host.latents)
        if host.missing:
            pixels = host.pixels.to(model.device, non_blocking=True)
            if host.jitter:
                pixels = color_jitter(pixels, host.jitter)
            pixels = flip_where(pixels, [host.flips[k] for k in host.missing])
            with autocast(model.device, self.step_encode_precision, enabled=model.device.type == "cuda"):
                encoded = self._encode(model, pixels, host.records)
            for k, lat in zip(host.missing, encoded):
                latents[k] = lat
        device = model.device
        captions = host.captions
        return Batch(
            latents=torch.stack([lat.to(device, torch.float32) for lat in latents]),
            captions=captions,
            cond=self._text.batch(captions, device) if self.text_cache_enabled and len(self._text) else None,
            time_ids=torch.tensor(host.time_ids, dtype=torch.float32, device=device),
            loss_weights=torch.tensor(host.weights, dtype=torch.float32, device=device),
            share=host.share,
            masks=to_latent_size(torch.stack(host.masks).to(device), latents[0].shape[-2:]) if host.masks else None,
        )
