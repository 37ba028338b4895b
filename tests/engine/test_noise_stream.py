"""A run's noise and timesteps come from a stream of their own, not from the one the LoRA's initial
weights are drawn from: seeded alike, two generators give the same numbers, and the first steps' noise
then repeated the init's (the kohya comparison in bench/README.md found them correlated)."""

from __future__ import annotations

import torch

import engine.train as train_module
from engine.models import tiny_sd1
from engine.runtime import noise_seed
from engine.train import train
from tests.engine.train_fixtures import pattern_dataset, quick_config


def test_the_step_noise_stream_is_not_the_lora_init_stream(tmp_path, monkeypatch):
    states = []

    class Recording(train_module.TrainingStep):
        def __init__(self, *args, generator, **kwargs):
            states.append(generator.get_state())  # before the first step's draws
            super().__init__(*args, generator=generator, **kwargs)

    monkeypatch.setattr(train_module, "TrainingStep", Recording)
    seed = 11
    train(quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", seed=seed, max_train_steps=1),
          tiny_sd1(seed=3))
    noise_stream = torch.randn(4096, generator=torch.Generator().set_state(states[0]))
    torch.manual_seed(seed)  # what the LoRA's initial weights are drawn from
    init_stream = torch.randn(4096)
    assert abs(torch.corrcoef(torch.stack([init_stream, noise_stream]))[0, 1]) < 0.1
    assert torch.equal(noise_stream, torch.randn(4096, generator=torch.Generator().manual_seed(noise_seed(seed))))


def test_noise_seed_is_fixed_per_seed_and_differs_between_seeds():
    assert noise_seed(0) == noise_seed(0) != 0
    assert len({noise_seed(s) for s in range(100)}) == 100
    assert all(0 <= noise_seed(s) < 2**63 for s in (0, 1, 2**31 - 1, 2**62))
