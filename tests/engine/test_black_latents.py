"""Black latents while caching (engine/data/latent_check.py): a VAE stand-in that returns NaN (and all
zeros) in fp16 gets those images encoded again in fp32; a VAE that cannot be helped is reported."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine.data.latent_check import encode_checked
from engine.errors import DatasetError
from engine.models import tiny_sd1
from engine.train import train
from tests.engine.train_fixtures import pattern_dataset, quick_config


def _fp16_overflowing(model):
    """The model's VAE stored in fp16; in fp16 it gives NaN for the first image and zeros for the rest
    (as an SDXL VAE overflowing, and a host that zeroes NaN), in fp32 the real latents."""
    real = model.encode_images
    model.vae.to(torch.float16)
    calls = []

    def encode_images(pixels):
        calls.append(next(model.vae.parameters()).dtype)
        if calls[-1] == torch.float16:
            out = torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
            out[0] = float("nan")
            return out
        return real(pixels)

    model.encode_images = encode_images
    return calls


def test_nan_and_black_latents_are_encoded_again_in_fp32():
    model = tiny_sd1(seed=3)
    reference = tiny_sd1(seed=3)
    reference.vae.to(torch.float16).to(torch.float32)  # the fp16 weights, computing in fp32
    calls = _fp16_overflowing(model)
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    latents, again = encode_checked(model, pixels)
    assert again == 3 and calls == [torch.float16, torch.float32]
    torch.testing.assert_close(latents, reference.encode_images(pixels).float())
    after = model.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def test_a_run_caches_good_latents_from_an_overflowing_fp16_vae(tmp_path, caplog):
    model = tiny_sd1(seed=3)
    _fp16_overflowing(model)
    cfg = quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=2)
    with caplog.at_level(logging.WARNING):
        result = train(cfg, model)
    assert result.steps == 2 and np.isfinite(result.losses).all()
    assert "the VAE gave NaN or black latents for 4 image(s) in torch.float16; encoded them again in fp32" in caplog.text


def test_a_vae_that_cannot_be_helped_is_reported_with_the_image(tmp_path):
    model = tiny_sd1(seed=3)
    model.encode_images = lambda pixels: torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
    cfg = quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=2)
    with pytest.raises(DatasetError, match=r"all-zero \(black\) latents for '.*img0.png' and 3 more"):
        train(cfg, model)
