"""`python -m engine check`: a folder with a duplicate, a near duplicate, a corrupt file, tiny images,
missing/empty/long captions, and the steps and advice a user sees before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine import check as check_module
from engine.check import check_dataset, check_main, perceptual_hash, recommendation
from engine.config import TrainConfig
from engine.errors import DatasetError


def pattern(seed: int, size=(128, 128)) -> Image.Image:
    """A smooth random picture: distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
    return small.resize(size, Image.BICUBIC)


@pytest.fixture
def messy(tmp_path):
    ds = tmp_path / "数据 set" / "10_sks"
    ds.mkdir(parents=True)
    for i in range(5):
        pattern(i).save(ds / f"img{i}.png")
        (ds / f"img{i}.txt").write_text(f"sks, tag{i}, common", encoding="utf-8")
    (ds / "copy.png").write_bytes((ds / "img0.png").read_bytes())  # exact duplicate
    pattern(1).resize((96, 96)).save(ds / "resized.jpg", quality=85)  # near duplicate of img1, no caption
    (ds / "resized.txt").write_text("   \n", encoding="utf-8")  # empty caption file
    pattern(9, (80, 80)).save(ds / "small.png")  # below 128x128 training resolution
    pattern(10, (32, 32)).save(ds / "thumb.png")  # below min_image_size: training skips it
    (ds / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (ds / "img4.txt").write_text(", ".join(f"extra long descriptive tag {k}" for k in range(25)), encoding="utf-8")
    return ds.parent


def run_check(folder, **cfg):
    return check_dataset(TrainConfig(train_data_dir=str(folder), resolution="128", **cfg))


def names(paths):
    return sorted(p.name for p in paths)


def test_report_finds_every_problem(messy):
    report = run_check(messy, epochs=3)
    assert report.image_count == 8  # 5 + copy + resized + small; thumb and broken are skipped
    assert {p.name: why for p, why in report.unreadable} == {
        "broken.jpg": "damaged or not an image", "thumb.png": "too small (32x32, minimum side 64)"}
    assert [names(g) for g in report.exact_duplicates] == [["copy.png", "img0.png"]]
    assert [names(g) for g in report.near_duplicates] == [["img1.png", "resized.jpg"]]
    assert names(report.folder_captions) == ["copy.png", "small.png"]  # kohya: the folder's "sks" is their caption
    assert report.missing_captions == []
    assert names(report.empty_captions) == ["resized.jpg"]
    assert [(p.name, n > 75) for p, n in report.long_captions] == [("img4.png", True)]
    assert [(p.name, w, h) for p, w, h in report.too_small] == [("resized.jpg", 96, 96), ("small.png", 80, 80)]
    assert report.token_counter == "CLIP tokenizer"
    assert report.tag_frequency["10_sks"]["common"] == 4
    text = report.to_text()
    for needle in ("broken.jpg", "10_sks/copy.png = 10_sks/img0.png", "10_sks/img1.png ~ 10_sks/resized.jpg",
                   "small.png (80x80)", "75-token window", "2 only the folder name", "Problems (6)"):
        assert needle in text


def test_steps_follow_repeats_batches_and_accumulation(messy):
    report = run_check(messy, epochs=3, batch_size=2, gradient_accumulation_steps=2)
    # 8 images x 10 repeats = 80 samples; the three buckets hold 50/10/20 samples -> 25+5+10 = 40 batches
    assert report.steps["samples_per_epoch"] == 80
    assert report.steps["batches_per_epoch"] == sum(-(-10 * n // 2) for n in report.buckets.values())
    assert report.steps["steps_per_epoch"] == -(-report.steps["batches_per_epoch"] // 2)
    assert report.steps["total_steps"] == -(-3 * report.steps["batches_per_epoch"] // 2)
    capped = run_check(messy, max_train_steps=7)
    assert capped.steps["total_steps"] == 7


def test_clean_folder_has_no_problems_and_advice_scales_with_size(tmp_path):
    for i in range(4):
        pattern(100 + i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a picture, item {i}", encoding="utf-8")
    report = run_check(tmp_path, repeats=15, epochs=12)
    assert report.problems() == []
    assert "No problems found" in report.to_text() and "in the usual range" in report.to_text()
    (tmp_path / "3.txt").unlink()
    report = run_check(tmp_path, repeats=1, epochs=2)
    assert names(report.missing_captions) == ["3.png"] and "fewer than usual" in report.to_text()
    assert "1-2 repeats x 15-20 epochs at rank 8-16" in recommendation(75)
    assert "10-20 repeats" in recommendation(4) and "add more" in recommendation(4)
    assert "rank 16-32" in recommendation(500)


def test_token_count_falls_back_to_a_labelled_estimate(messy, monkeypatch):
    import engine.models.clip_tokenizer as tok

    def missing(*a, **k):
        raise RuntimeError("no tokenizer data")

    monkeypatch.setattr(tok, "clip_tokenizer", missing)
    counts, how = check_module.count_tokens(["a photo of sks, red hair"])
    assert how.startswith("approximate") and counts[0] >= 6


def test_perceptual_hash_tolerates_resizing_but_not_other_pictures():
    a, b = perceptual_hash(pattern(1)), perceptual_hash(pattern(1).resize((64, 200)).resize((128, 128)))
    other = perceptual_hash(pattern(2))
    assert (a ^ b).bit_count() <= 6 < (a ^ other).bit_count()


def test_cli_text_json_strict_and_errors(messy, tmp_path, capsys):
    assert check_main([str(messy), "--resolution", "128"]) == 0
    assert "10_sks/copy.png = 10_sks/img0.png" in capsys.readouterr().out
    assert check_main([str(messy), "--resolution", "128", "--strict", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exact_duplicates"] == [["10_sks/copy.png", "10_sks/img0.png"]] and data["images"] == 8
    assert check_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_main(["--help"])
    with pytest.raises(DatasetError):
        run_check(tmp_path / "nope")
