"""Gathering the next batch in a thread trains exactly like gathering it in line.

The loop turns the prefetch on for CUDA runs that decode images or read disk caches every step;
here it is forced on for a CPU run without latent caching, with every per-sample random choice in
play (random crops, flips, colour jitter, shuffled captions) and more steps than one epoch has.
"""

import torch

import engine.train as train_module
import engine.train_loop as train_loop
from engine.data.prefetch import Prefetch
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


def test_prefetched_run_matches_the_in_line_run(tmp_path, monkeypatch):
    data = pattern_dataset(tmp_path / "data", n=3, size=96)
    opts = dict(max_train_steps=5, batch_size=2, cache_latents="off", random_crop=True, flip_aug=True,
                color_jitter=0.2, shuffle_caption=True, resolution="64")
    in_line = train(quick_config(data, tmp_path / "a", **opts), tiny_sd1())

    hits = []

    class Forced(Prefetch):
        def __init__(self, data, *, enabled):
            super().__init__(data, enabled=True)

        def get(self, plan, epoch, index):
            hits.append(self.pending is not None and self.pending[:2] == (epoch, index))
            return super().get(plan, epoch, index)

    monkeypatch.setattr(train_loop, "Prefetch", Forced)
    ahead = train(quick_config(data, tmp_path / "b", **opts), tiny_sd1())
    assert len(hits) == 5 and not hits[0] and all(hits[1:]), hits  # every batch after the first came ahead
    assert in_line.losses == ahead.losses
    for key, value in in_line.tensors.items():
        assert torch.equal(value, ahead.tensors[key]), key


def test_bf16_training_encodes_uncached_latents_under_autocast_unless_no_half_vae(tmp_path, monkeypatch):
    data = pattern_dataset(tmp_path / "data", n=2)
    seen = []
    original = train_module.Trainer._setup_optimization

    def record(self, network):
        original(self, network)
        seen.append(self.data.step_encode_precision)

    monkeypatch.setattr(train_module.Trainer, "_setup_optimization", record)
    for extra in ({}, {"no_half_vae": True}):
        train(quick_config(data, tmp_path / str(len(seen)), max_train_steps=1, mixed_precision="bf16",
                           cache_latents="off", **extra), tiny_sd1())
    train(quick_config(data, tmp_path / "fp32", max_train_steps=1, cache_latents="off"), tiny_sd1())
    assert seen == ["bf16", "no", "no"]
