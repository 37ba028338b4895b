"""TrainData: epoch plans, regularisation, augmentation and the batches the loop trains on."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from engine.data import TrainData
from engine.errors import DatasetError

try:
    from .data_fixtures import FakeModel, make_cfg, make_folder, make_image
except ImportError:
    from data_fixtures import FakeModel, make_cfg, make_folder, make_image


def mixed_folder(root):
    make_folder(root, {"sq1": "red, square", "sq2": "blue, square", "sq3": None})
    make_folder(root, {"wide1": "wide, tag", "wide2": "wide"}, size=(256, 64))
    make_image(root / "tall.png", (64, 192), gradient=True)
    return root


def data(cfg, **kw):
    return TrainData(cfg, native_resolution=512, model_key=kw.pop("model_key", "fake-v1"),
                     train_text_encoder=kw.pop("train_text_encoder", False))


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch(tmp_path):
    cfg = make_cfg(mixed_folder(tmp_path / "d"), batch_size=2, repeats=3)
    a = data(cfg)
    random.seed(123)
    torch.manual_seed(123)
    plan0 = a.epoch_plan(0)
    random.seed(999)
    torch.manual_seed(999)
    assert data(cfg).epoch_plan(0) == plan0  # a fresh object, other global seeds: same batches
    assert a.epoch_plan(1) != plan0
    assert data(make_cfg(tmp_path / "d", batch_size=2, repeats=3, seed=8)).epoch_plan(0) != plan0
    assert len(plan0) == a.batches_per_epoch() == len(a.epoch_plan(5))
    counts = Counter(s.record for batch in plan0 for s in batch.samples)
    assert set(counts.values()) == {3} and len(counts) == 6  # every image exactly `repeats` times
    for batch in plan0:
        assert len({a.placements[s.record].bucket for s in batch.samples}) == 1
        assert batch.bucket == a.placements[batch.samples[0].record].bucket
    assert [b.index for b in plan0] == list(range(len(plan0)))


def test_materialize_is_exact_on_resume_and_leaves_global_rng_alone(tmp_path):
    cfg = make_cfg(mixed_folder(tmp_path / "d"), batch_size=2, repeats=2, flip_aug=True, random_crop=True,
                   color_jitter=0.5, shuffle_caption=True, trigger_word="ohwx", caption_dropout=0.2)
    first, resumed = data(cfg), data(cfg)
    model = FakeModel()
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    full = [first.materialize(p, model, epoch=3) for p in first.epoch_plan(3)]
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    k = 2  # a run stopped after 2 batches and resumed in a new process
    again = [resumed.materialize(p, model, epoch=3) for p in resumed.epoch_plan(3)[k:]]
    for x, y in zip(full[k:], again):
        assert torch.equal(x.latents, y.latents) and x.captions == y.captions
        assert torch.equal(x.time_ids, y.time_ids)
    other = [first.materialize(p, model, epoch=4) for p in first.epoch_plan(3)]
    assert any(not torch.equal(x.latents, y.latents) for x, y in zip(full, other))


def test_reg_images_are_cycled_to_the_train_count_and_weighted(tmp_path):
    make_folder(tmp_path / "train" / "2_ohwx dog", {"a": None, "b": None, "c": None})
    make_folder(tmp_path / "reg" / "1_dog", {"r1": None, "r2": None}, size=(128, 128))
    cfg = make_cfg(tmp_path / "train", reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5, batch_size=3)
    d = data(cfg)
    assert (d.num_train_images, d.num_reg_images) == (6, 2)
    reg_counts = Counter(d.records[s.record].path.name for s in d.samples if d.records[s.record].is_reg)
    assert reg_counts == {"r1.png": 3, "r2.png": 3}  # 6 reg samples for 6 train samples
    assert d.batches_per_epoch() == 4
    model = FakeModel()
    seen = []
    for plan in d.epoch_plan(0):
        batch = d.materialize(plan, model, epoch=0)
        for s, w, cap in zip(plan.samples, batch.loss_weights.tolist(), batch.captions):
            rec = d.records[s.record]
            assert w == (0.5 if rec.is_reg else 1.0)
            assert cap == ("dog" if rec.is_reg else "ohwx dog")  # folder tokens as fallback captions
            seen.append(rec.is_reg)
    assert seen.count(True) == seen.count(False) == 6
    summary = d.summary()
    assert summary["dataset_dirs"] == {"2_ohwx dog": {"n_repeats": 2, "img_count": 3}}
    assert summary["reg_dataset_dirs"] == {"1_dog": {"n_repeats": 1, "img_count": 2}}


def test_more_reg_images_than_needed_uses_only_as_many(tmp_path):
    make_folder(tmp_path / "train", {"a": "x"})
    make_folder(tmp_path / "reg", {f"r{i}": None for i in range(5)})
    d = data(make_cfg(tmp_path / "train", reg_data_dir=str(tmp_path / "reg"), repeats=2))
    assert sum(d.records[s.record].is_reg for s in d.samples) == 2 and len(d.samples) == 4


def test_empty_reg_folder_is_an_error(tmp_path):
    make_folder(tmp_path / "train", {"a": "x"})
    (tmp_path / "reg").mkdir()
    with pytest.raises(DatasetError, match="regularisation"):
        data(make_cfg(tmp_path / "train", reg_data_dir=str(tmp_path / "reg")))


def test_time_ids_latents_and_summary_without_buckets(tmp_path):
    root = tmp_path / "d"
    make_image(root / "wide.png", (200, 100), gradient=True)
    (root / "wide.txt").write_text("Wide, Gradient", encoding="utf-8")
    d = data(make_cfg(root, enable_bucket=False, cache_latents="off"))
    model = FakeModel()
    batch = d.materialize(d.epoch_plan(0)[0], model, epoch=0)
    assert batch.latents.shape == (1, 4, 16, 16) and batch.latents.dtype == torch.float32
    assert batch.time_ids.tolist() == [[100, 200, 0, 64, 128, 128]]  # orig h,w; crop top,left; target h,w
    assert batch.cond is None or batch.cond["context"].shape[0] == 1
    s = d.summary()
    assert s["resolution"] == (128, 128)
    assert s["tag_frequency"] == {"d": {"wide": 1, "gradient": 1}}
    assert s["bucket_info"]["buckets"] == {0: {"resolution": (128, 128), "count": 1}}


def test_random_crop_moves_the_window_per_epoch_deterministically(tmp_path):
    root = tmp_path / "d"
    make_image(root / "wide.png", (300, 100), gradient=True)
    d = data(make_cfg(root, enable_bucket=False, random_crop=True))
    assert d.latent_cache_mode is None  # a moving crop cannot be cached
    model = FakeModel()
    crops = [d.materialize(d.epoch_plan(e)[0], model, epoch=e).time_ids[0, 3].item() for e in range(12)]
    assert len(set(crops)) > 3 and all(0 <= c <= 384 - 128 for c in crops)
    assert crops == [d.materialize(d.epoch_plan(e)[0], model, epoch=e).time_ids[0, 3].item() for e in range(12)]


def test_flip_aug_mirrors_latents_and_crop_left(tmp_path):
    root = tmp_path / "d"
    make_image(root / "g.png", (251, 128), gradient=True)  # crop window 61..189 of 251: off-centre by 1
    model = FakeModel()
    plain = data(make_cfg(root, enable_bucket=False, cache_latents="off"))
    ref = plain.materialize(plain.epoch_plan(0)[0], model, epoch=0)
    d = data(make_cfg(root, enable_bucket=False, flip_aug=True, cache_latents="off"))
    batches = [d.materialize(d.epoch_plan(e)[0], model, epoch=e) for e in range(12)]
    flipped = [not torch.equal(b.latents, ref.latents) for b in batches]
    assert 2 <= sum(flipped) <= 10
    for b, f in zip(batches, flipped):
        if f:
            assert torch.allclose(b.latents, torch.flip(ref.latents, dims=[3]), atol=1e-5)
            assert b.time_ids[0].tolist() == [128, 251, 0, 62, 128, 128]  # left edge seen in the mirror
        else:
            assert b.time_ids[0].tolist() == [128, 251, 0, 61, 128, 128]


def test_color_jitter_changes_pixels_deterministically(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "x"})
    plain = data(make_cfg(root))
    jit = data(make_cfg(root, color_jitter=0.8))
    model = FakeModel()
    p = plain.materialize(plain.epoch_plan(0)[0], model, epoch=0).latents
    j1 = jit.materialize(jit.epoch_plan(0)[0], model, epoch=0).latents
    j2 = jit.materialize(jit.epoch_plan(0)[0], model, epoch=0).latents
    j3 = jit.materialize(jit.epoch_plan(1)[0], model, epoch=1).latents
    assert torch.equal(j1, j2) and not torch.allclose(p, j1, atol=1e-3) and not torch.allclose(j1, j3, atol=1e-3)


def test_nan_latent_names_the_image_and_suggests_fp32_vae(tmp_path):
    root = tmp_path / "d"
    make_image(root / "红 red.png", (128, 128), color=(255, 0, 0))
    d = data(make_cfg(root))
    with pytest.raises(DatasetError, match=r"红 red.png.*fp32"):
        d.prepare_cache(FakeModel(nan_for_red=True))


def test_sdxl_native_resolution_raises_the_default_bucket_limit(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "x"})
    d = TrainData(make_cfg(root, resolution="auto", max_bucket_reso=1024, min_bucket_reso=256),
                  native_resolution=1024, model_key="sdxl", train_text_encoder=False)
    assert d.resolution == (1024, 1024)
    assert (2048, 512) in d.buckets.resos and (1024, 1024) in d.buckets.resos
    assert d.materialize(d.epoch_plan(0)[0], FakeModel(), epoch=0).latents.shape == (1, 4, 128, 128)
