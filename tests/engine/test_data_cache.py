"""Latent and text-encoder caches: what is encoded once, what is re-encoded, what is never cached."""

from __future__ import annotations

import torch

from engine.data import TrainData

try:
    from .data_fixtures import FakeModel, make_cfg, make_folder, make_image, write_text
except ImportError:
    from data_fixtures import FakeModel, make_cfg, make_folder, make_image, write_text


def data(cfg, model_key="fake-v1", train_text_encoder=False):
    return TrainData(cfg, native_resolution=512, model_key=model_key, train_text_encoder=train_text_encoder)


def all_batches(d, model, epoch=0):
    return [d.materialize(p, model, epoch=epoch) for p in d.epoch_plan(epoch)]


def test_memory_cache_encodes_each_image_once_in_batches(tmp_path):
    root = make_folder(tmp_path / "d", {f"i{k}": f"tag{k}" for k in range(5)})
    d = data(make_cfg(root, repeats=3, batch_size=2))
    assert d.latent_cache_mode == "memory"
    model = FakeModel()
    progress = []
    d.prepare_cache(model, progress=lambda i, n: progress.append((i, n)))
    assert model.images_encoded == 5 and model.image_calls == 2  # vae batches of 4
    assert progress[-1][0] == progress[-1][1] == len(progress)
    before = model.image_calls
    batches = all_batches(d, model)
    assert model.image_calls == before  # every latent came from the cache
    uncached = data(make_cfg(root, repeats=3, batch_size=2, cache_latents="off"))
    for a, b in zip(batches, all_batches(uncached, FakeModel())):
        assert torch.allclose(a.latents, b.latents, atol=1e-6)


def test_disk_cache_hits_and_reencodes_only_a_changed_image_or_model(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "x", "b": "y", "c": "z"})
    cfg = make_cfg(root, cache_latents="disk")
    m1 = FakeModel()
    data(cfg).prepare_cache(m1)
    files = list((root / ".lora_cache").glob("*.safetensors"))
    assert m1.images_encoded == 3 and len(files) == 3

    m2 = FakeModel()
    d2 = data(cfg)
    assert not any(".lora_cache" in w for w in d2.warnings)  # the cache folder is not a dataset subfolder
    d2.prepare_cache(m2)
    assert m2.images_encoded == 0  # a new run reuses the files
    all_batches(d2, m2)
    assert m2.images_encoded == 0

    make_image(root / "b.png", (128, 128), color=(1, 2, 3))  # the user edits one picture
    m3 = FakeModel()
    data(cfg).prepare_cache(m3)
    assert m3.images_encoded == 1

    m4 = FakeModel()
    data(cfg, model_key="another-checkpoint").prepare_cache(m4)
    assert m4.images_encoded == 3

    moved = root.rename(tmp_path / "moved folder")  # keys are content hashes, not paths
    m5 = FakeModel()
    data(make_cfg(moved, cache_latents="disk"), model_key="another-checkpoint").prepare_cache(m5)
    assert m5.images_encoded == 0


def test_flip_aug_caches_both_latents_and_uses_them(tmp_path):
    root = tmp_path / "d"
    make_image(root / "g.png", (128, 128), gradient=True)
    for mode in ("memory", "disk"):
        d = data(make_cfg(root, flip_aug=True, cache_latents=mode))
        model = FakeModel()
        d.prepare_cache(model)
        assert model.images_encoded == 2  # the image and its mirror
        calls = model.image_calls
        lats = [d.materialize(d.epoch_plan(e)[0], model, epoch=e).latents for e in range(10)]
        assert model.image_calls == calls
        distinct = {tuple(x.flatten()[:4].tolist()) for x in lats}
        assert len(distinct) == 2  # plain and mirrored
        assert any(torch.allclose(lats[0], torch.flip(x, dims=[3])) for x in lats[1:])


def test_disk_cache_without_flip_is_extended_when_flip_is_turned_on(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "x"})
    data(make_cfg(root, cache_latents="disk")).prepare_cache(FakeModel())
    model = FakeModel()
    data(make_cfg(root, cache_latents="disk", flip_aug=True)).prepare_cache(model)
    assert model.images_encoded == 2


def test_moving_augmentations_disable_latent_cache_with_a_warning_when_asked(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "x"})
    assert data(make_cfg(root, random_crop=True)).latent_cache_mode is None
    assert data(make_cfg(root, color_jitter=0.3)).latent_cache_mode is None
    d = data(make_cfg(root, random_crop=True, cache_latents="disk"))
    assert d.latent_cache_mode is None and any("random_crop" in w for w in d.warnings)
    model = FakeModel()
    d.prepare_cache(model)
    assert model.images_encoded == 0


def test_text_cache_covers_fixed_captions_and_the_dropout_caption(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "red, cat", "b": "blue, dog"})
    d = data(make_cfg(root, trigger_word="ohwx", caption_dropout=0.5, repeats=4, batch_size=2))
    assert d.text_cache_enabled
    model = FakeModel()
    d.prepare_cache(model)
    assert d.cached_captions() == ["", "ohwx, blue, dog", "ohwx, red, cat"]
    text_calls = model.text_calls
    seen = set()
    for batch in all_batches(d, model):
        direct = model.encode_text(batch.captions)
        assert batch.cond is not None and torch.equal(batch.cond["context"], direct["context"])
        assert torch.equal(batch.cond["pooled"], direct["pooled"])
        seen.update(batch.captions)
    assert model.text_calls - text_calls == d.batches_per_epoch()  # only the direct calls above
    assert "" in seen and "ohwx, red, cat" in seen


def test_text_cache_is_off_when_captions_change_or_the_encoder_trains(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "red, cat"})
    shuffled = data(make_cfg(root, shuffle_caption=True, cache_text_encoder_outputs="on"))
    assert not shuffled.text_cache_enabled and any("shuffle_caption" in w for w in shuffled.warnings)
    assert not data(make_cfg(root), train_text_encoder=True).text_cache_enabled
    assert not data(make_cfg(root, cache_text_encoder_outputs="off")).text_cache_enabled
    model = FakeModel()
    shuffled.prepare_cache(model)
    assert model.text_calls == 0
    assert shuffled.materialize(shuffled.epoch_plan(0)[0], model, epoch=0).cond is None


def test_path_with_spaces_and_chinese_characters(tmp_path):
    root = tmp_path / "我的 数据集" / "训练 图片"
    make_folder(root / "5_女孩 style", {"照片 一": "红色, 女孩", "photo two": None}, ext=".jpg")
    write_text(root / "metadata.csv", "file_name,text\n5_女孩 style/photo two.jpg,\"蓝色, 天空\"\n")
    d = data(make_cfg(root, cache_latents="disk", trigger_word="女孩"))
    assert sorted(r.caption for r in d.records) == ["红色, 女孩", "蓝色, 天空"]
    model = FakeModel()
    d.prepare_cache(model)
    assert model.images_encoded == 2 and any((root / ".lora_cache").iterdir())
    captions = {c for b in all_batches(d, model) for c in b.captions}
    assert captions == {"女孩, 红色", "女孩, 蓝色, 天空"}
    assert d.summary()["dataset_dirs"] == {"5_女孩 style": {"n_repeats": 5, "img_count": 2}}
