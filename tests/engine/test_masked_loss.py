"""Masked loss (kohya's masked_loss / alpha_mask): a mask per image from <image>_mask.png or the alpha
channel, through the image's resize, crop and flip, at the latents' size; the masked region gets no
gradient, and cached latents keep their masks (the fast step with masks: test_features_fast_step.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.data import TrainData
from engine.data.images import list_image_paths
from engine.models import tiny_sd1
from engine.objectives import weighted_mse
from engine.train import train

from train_fixtures import pattern_dataset, quick_config

try:
    from .data_fixtures import FakeModel, make_cfg, make_image
except ImportError:
    from data_fixtures import FakeModel, make_cfg, make_image


def _half_mask(path, size=(128, 128), left_black=True):
    arr = np.full((size[1], size[0]), 255, dtype=np.uint8)
    arr[:, : size[0] // 2] = 0 if left_black else 255
    Image.fromarray(arr, "L").save(path)


def _data(root, **cfg):
    return TrainData(make_cfg(root, batch_size=1, **cfg), native_resolution=128, model_key="fake",
                     train_text_encoder=False)


def test_the_loss_is_kohyas_masked_mean_and_the_masked_pixels_get_no_gradient():
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0
    loss = weighted_mse(prediction, target, mask=mask)
    assert torch.allclose(loss, ((prediction - target) ** 2 * mask).mean([1, 2, 3]).mean())  # apply_masked_loss
    loss.backward()
    assert torch.all(prediction.grad[..., :4] == 0) and torch.all(prediction.grad[..., 4:] != 0)


def test_mask_files_beside_images_are_masks_not_images(tmp_path):
    make_image(tmp_path / "a.png")
    _half_mask(tmp_path / "a_mask.png")
    make_image(tmp_path / "lone_mask.png")  # no "lone.png": an ordinary image with that name
    assert [p.name for p in list_image_paths(tmp_path)] == ["a.png", "lone_mask.png"]


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_masks_follow_flips_to_latent_size_and_stay_with_cached_latents(tmp_path, cache):
    make_image(tmp_path / "a.png", gradient=True)
    _half_mask(tmp_path / "a_mask.png")
    d = _data(tmp_path, masked_loss=True, flip_aug=True, cache_latents=cache, repeats=8, resolution="128")
    model = FakeModel()
    d.prepare_cache(model)
    seen = set()
    for epoch in range(2):
        for plan in d.epoch_plan(epoch):
            batch = d.materialize(plan, model, epoch=epoch)
            assert batch.masks.shape == (1, 1, *batch.latents.shape[-2:]) == (1, 1, 16, 16)
            left, right = batch.masks[0, 0, :, :8], batch.masks[0, 0, :, 8:]
            flipped = bool(left.mean() > right.mean())
            assert {float(left.mean()), float(right.mean())} == {0.0, 1.0}
            # the fake VAE keeps pixels in place: a flipped latent has its bright (gradient) side left
            assert flipped == bool(batch.latents[0, 0, :, :8].mean() > batch.latents[0, 0, :, 8:].mean())
            seen.add(flipped)
    assert seen == {True, False}


def test_alpha_channel_and_images_without_masks(tmp_path):
    rgba = np.zeros((128, 128, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[64:, :, 3] = 255  # bottom half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    d = _data(tmp_path, alpha_mask=True, resolution="128")
    model = FakeModel()
    masks = {}
    for plan in d.epoch_plan(0):
        batch = d.materialize(plan, model, epoch=0)
        masks[d.records[plan.samples[0].record].path.name] = batch.masks[0, 0]
    assert torch.all(masks["a.png"][:8] == 0) and torch.all(masks["a.png"][8:] == 1)
    assert torch.all(masks["b.png"] == 1)  # no alpha, no mask file: trains everywhere
    make_image(tmp_path / "none" / "c.png")
    assert any("no image has a mask" in w for w in _data(tmp_path / "none", masked_loss=True).warnings)


def test_no_mask_means_no_mask_key(tmp_path):
    make_image(tmp_path / "a.png")
    batch = _data(tmp_path).materialize(_data(tmp_path).epoch_plan(0)[0], FakeModel(), epoch=0)
    assert batch.masks is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = pattern_dataset(tmp_path_factory.mktemp("masked"), n=2)
    for i in range(2):
        Image.new("L", (64, 64), 0).save(root / f"img{i}_mask.png")  # everything masked out
    return root


def test_a_fully_masked_dataset_learns_nothing(data, tmp_path):
    cfg = quick_config(data, tmp_path, max_train_steps=3, masked_loss=True, weight_decay=0.0)
    result = train(cfg, tiny_sd1())
    assert result.losses == [0.0, 0.0, 0.0]
    assert result.metadata["ss_masked_loss"] == "True"
    ups = [v for k, v in load_file(str(result.lora_path)).items() if k.endswith("lora_up.weight")]
    assert all(torch.count_nonzero(u) == 0 for u in ups)  # lora_up starts at zero and got no gradient


def test_a_hosts_masks_saved_to_a_mask_folder_reach_the_batches(tmp_path):
    from engine.data.masks import save_masks

    from engine.errors import DatasetError

    make_image(tmp_path / "d" / "a.png")
    make_image(tmp_path / "d" / "b.png")
    masks = torch.ones(2, 64, 64)  # ComfyUI's MASK: [N, H, W], any size
    masks[0, :, :32] = 0
    folder = save_masks(masks, [tmp_path / "d" / "a.png", tmp_path / "d" / "b.png"], tmp_path / "masks")
    d = _data(tmp_path / "d", masked_loss=True, conditioning_data_dir=str(folder), resolution="128")
    got = {}
    for plan in d.epoch_plan(0):
        batch = d.materialize(plan, FakeModel(), epoch=0)
        got[d.records[plan.samples[0].record].path.name] = batch.masks[0, 0]
    assert torch.all(got["a.png"][:, :7] == 0) and torch.all(got["a.png"][:, 9:] == 1)  # upscaled: a soft edge
    assert torch.all(got["b.png"] == 1)
    with pytest.raises(DatasetError, match="one mask per image"):
        save_masks(torch.ones(3, 8, 8), [tmp_path / "d" / "a.png", tmp_path / "d" / "b.png"], tmp_path / "m2")
