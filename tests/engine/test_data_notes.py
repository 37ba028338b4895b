"""Every file in a dataset folder is trained on or named once: unused files, animated images, converted
colour modes, a folder of nothing but broken images, captions that disagree, near-duplicates that are
really the same picture (not the same layout in another colour)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine.check import check_dataset
from engine.config import TrainConfig
from engine.data import scan_dataset
from engine.errors import DatasetError
from engine.models.demo_shapes import BACKGROUNDS, COLOURS, Scene, draw

from data_fixtures import make_folder, write_text


def _one(warnings: list[str], needle: str) -> str:
    found = [w for w in warnings if needle in w]
    assert len(found) == 1, warnings
    return found[0]


def test_unused_files_are_named_once_by_kind(tmp_path):
    make_folder(tmp_path, {"a": "a cat", "b": "a dog"})
    Image.new("RGB", (80, 80)).save(tmp_path / "c.gif")
    Image.new("RGB", (80, 80)).save(tmp_path / "d.tiff")
    write_text(tmp_path / "orphan.txt", "no image")
    write_text(tmp_path / "a.txt.bak", "old caption")
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "a.npz").write_bytes(b"\x00")
    result = scan_dataset(tmp_path)
    line = _one(result.warnings, "Not used for training")
    for needle in ("2 images in a format that is not read", "c.gif, d.tiff", "1 caption files without an image",
                   "orphan.txt", "a.txt.bak", "kohya latent caches", "a.npz", "1 other files: notes.docx"):
        assert needle in line
    assert "a.txt," not in line and "b.txt" not in line and "a.png" not in line


def test_animated_and_converted_images_get_one_line_each(tmp_path):
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    Image.new("I;16", (80, 80), 40000).save(tmp_path / "deep.png")
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 255))
    rgba.putpixel((3, 3), (255, 0, 0, 0))
    rgba.save(tmp_path / "cutout.png")
    Image.new("RGBA", (80, 80), (0, 0, 255, 255)).save(tmp_path / "opaque_rgba.png")  # alpha, but nothing to change
    Image.new("RGB", (80, 80)).save(tmp_path / "plain.png")
    warnings = scan_dataset(tmp_path).warnings
    assert "anim.webp (3 frames)" in _one(warnings, "only the first frame is trained on")
    assert "print.jpg" in _one(warnings, "CMYK image(s) are converted to RGB")
    assert "deep.png" in _one(warnings, "16-bit image(s) are reduced to 8 bits")
    alpha = _one(warnings, "transparent pixels are put on a white background")
    assert "cutout.png" in alpha and "opaque_rgba" not in alpha
    assert not any("plain.png" in w for w in warnings if "no caption" not in w)


def test_a_folder_of_broken_images_says_so_once_and_not_as_a_warning(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "thumb.png").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path)
    message = str(err.value)
    assert message.count("broken.png") == 1 and message.count("thumb.png") == 1
    assert "warning" not in message.lower() and message.startswith("No usable training images")


def test_metadata_and_a_disagreeing_sidecar_say_which_wins(tmp_path):
    make_folder(tmp_path, {"a": "sidecar says dog", "b": "same caption", "c": None})
    write_text(tmp_path / "metadata.csv", "file_name,text\na.png,metadata says cat\nb.png,same caption\n"
                                          "c.png,only metadata\n")
    result = scan_dataset(tmp_path)
    assert {r.path.name: r.caption for r in result.records}["a.png"] == "metadata says cat"
    line = _one(result.warnings, "metadata.csv wins")
    assert "1 image(s) have a caption in metadata.csv and a different one" in line and "a.png" in line
    assert "b.png" not in line and "c.png" not in line


def _shape(folder: Path, name: str, colour: str, size: int = 128) -> None:
    scene = Scene("circle", COLOURS[colour], BACKGROUNDS["white"], cx=32, cy=32, r=20)
    Image.fromarray(draw(scene)).resize((size, size)).save(folder / f"{name}.png")
    write_text(folder / f"{name}.txt", f"a {colour} circle")


def test_the_same_layout_in_other_colours_is_not_a_near_duplicate(tmp_path):
    for colour in ("red", "blue", "yellow", "purple"):
        _shape(tmp_path, colour, colour)
    _shape(tmp_path, "red_smaller_copy", "red", size=96)
    report = check_dataset(TrainConfig(train_data_dir=str(tmp_path), resolution="128"))
    assert [sorted(p.name for p in g) for g in report.near_duplicates] == [["red.png", "red_smaller_copy.png"]]
