"""Dataset discovery and captions: the folder layouts and caption files users actually bring."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from engine.data import load_image, scan_dataset, scan_images
from engine.data.records import ScanResult
from engine.errors import DatasetError

try:
    from .data_fixtures import make_folder, make_image, write_text
except ImportError:
    from data_fixtures import make_folder, make_image, write_text


def captions_of(result: ScanResult) -> dict[str, tuple[str, str]]:
    return {r.path.name: (r.caption, r.caption_source) for r in result.records}


def test_sidecar_prefers_configured_extension_then_the_other_and_reads_first_nonempty_line(tmp_path):
    make_folder(tmp_path, {"a": None, "b": None, "c": None})
    write_text(tmp_path / "a.txt", "from txt")
    write_text(tmp_path / "a.caption", "from caption")
    write_text(tmp_path / "b.caption", "\n\n  only caption file  \nsecond line\n")
    write_text(tmp_path / "c.txt", "c tags")
    got = captions_of(scan_dataset(tmp_path, caption_extension=".caption"))
    assert got["a.png"] == ("from caption", "sidecar")
    assert got["b.png"] == ("only caption file", "sidecar")
    assert got["c.png"] == ("c tags", "sidecar")  # falls back to .txt
    assert captions_of(scan_dataset(tmp_path, caption_extension=".txt"))["a.png"][0] == "from txt"


def test_headerless_csv_with_quoted_commas_and_bom(tmp_path):
    make_folder(tmp_path, {"img01": "sidecar loses", "img02": None, "img03": None})
    csv_text = 'img01.jpg,"1girl, red hair, smiling"\nimg02.png,"a cat, sitting"\nimg03.png,plain, unquoted, tags\n'
    # file names in metadata match by name; img01.jpg does not exist, img01.png keeps its sidecar
    write_text(tmp_path / "metadata.csv", "\ufeff" + csv_text.replace("img01.jpg", "img01.png"))
    got = captions_of(scan_dataset(tmp_path))
    assert got["img01.png"] == ("1girl, red hair, smiling", "metadata")
    assert got["img02.png"] == ("a cat, sitting", "metadata")
    assert got["img03.png"] == ("plain, unquoted, tags", "metadata")


@pytest.mark.parametrize("column", ["text", "caption"])
def test_csv_with_header(tmp_path, column):
    make_folder(tmp_path, {"x": None, "y": None})
    write_text(tmp_path / "metadata.csv", f'file_name,{column}\nx.png,"red, square"\ny.png,blue\n')
    got = captions_of(scan_dataset(tmp_path))
    assert got == {"x.png": ("red, square", "metadata"), "y.png": ("blue", "metadata")}


def test_jsonl_wins_over_sidecar_which_wins_over_folder_tokens(tmp_path):
    sub = tmp_path / "3_sks dog"
    make_folder(sub, {"a": "sidecar a", "b": "sidecar b", "c": None})
    lines = [{"file_name": "3_sks dog/a.png", "text": "meta a"}, {"file_name": "b.png", "text": ""},
             {"file_name": "gone.png", "text": "typo"}]
    write_text(tmp_path / "metadata.jsonl", "\n".join(json.dumps(x) for x in lines))
    result = scan_dataset(tmp_path)
    got = captions_of(result)
    assert got["a.png"] == ("meta a", "metadata")
    assert got["b.png"] == ("sidecar b", "sidecar")  # an empty metadata caption falls through
    assert got["c.png"] == ("sks dog", "folder")
    assert any("gone.png" in w for w in result.warnings)  # a metadata row matching no image is reported


def test_explicit_metadata_path_outside_the_folder(tmp_path):
    data = make_folder(tmp_path / "imgs", {"p": "sidecar"})
    meta = write_text(tmp_path / "caps.jsonl", json.dumps({"file_name": "p.png", "text": "explicit"}))
    assert captions_of(scan_dataset(data, metadata_path=meta))["p.png"] == ("explicit", "metadata")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    make_folder(tmp_path, {"p": None})
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "p.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl' line 2"):
        scan_dataset(tmp_path)


def test_kohya_subfolders_set_repeats_and_fallback_caption(tmp_path):
    make_folder(tmp_path / "10_ohwx woman", {"a": None, "b": "woman, beach"})
    make_folder(tmp_path / "2_style", {"c": None})
    make_folder(tmp_path / "misc", {"d": "ignored"})
    result = scan_dataset(tmp_path, repeats=5)
    by_name = {r.path.name: r for r in result.records}
    assert set(by_name) == {"a.png", "b.png", "c.png"}
    assert (by_name["a.png"].repeats, by_name["a.png"].caption) == (10, "ohwx woman")
    assert by_name["b.png"].caption == "woman, beach"
    assert (by_name["c.png"].repeats, by_name["c.png"].caption) == (2, "style")
    assert any("'misc'" in w and "N_name" in w for w in result.warnings)


def test_flat_folder_uses_configured_repeats_and_warns_about_missing_captions(tmp_path):
    make_folder(tmp_path, {"a": "x", "b": None})
    result = scan_dataset(tmp_path, repeats=4)
    assert [r.repeats for r in result.records] == [4, 4]
    assert any("1 image(s) have no caption" in w and "b.png" in w for w in result.warnings)


def test_only_unnumbered_subfolders_explains_the_rename(tmp_path):
    make_folder(tmp_path / "cats", {"a": "x"})
    with pytest.raises(DatasetError, match=r"rename it \(e.g. '10_cats'"):
        scan_dataset(tmp_path)


def test_corrupt_and_tiny_images_are_skipped_with_one_warning(tmp_path):
    make_folder(tmp_path, {"good": "ok"})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    make_image(tmp_path / "tiny.png", (20, 200))
    full = tmp_path / "truncated.png"
    make_image(full, (128, 128), gradient=True)
    full.write_bytes(full.read_bytes()[:300])
    (tmp_path / "._good.png").write_bytes(b"macOS resource fork")  # hidden: not even considered
    result = scan_dataset(tmp_path, min_image_size=32)
    assert [r.path.name for r in result.records] == ["good.png"]
    skip_warnings = [w for w in result.warnings if w.startswith("Skipped")]
    assert len(skip_warnings) == 1
    for name in ("broken.jpg", "tiny.png", "truncated.png"):
        assert name in skip_warnings[0]
    assert "._good" not in skip_warnings[0]


def test_all_images_unusable_is_an_error(tmp_path):
    make_image(tmp_path / "tiny.png", (16, 16))
    with pytest.raises(DatasetError, match="No usable training images"):
        scan_dataset(tmp_path, min_image_size=64)


def test_empty_folder_and_folder_without_images_say_what_was_found(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        scan_dataset(tmp_path)
    write_text(tmp_path / "notes.txt", "hello")
    (tmp_path / "art.psd").write_bytes(b"8BPS")
    (tmp_path / "art2.psd").write_bytes(b"8BPS")
    with pytest.raises(DatasetError, match=r"3 files \(.psd x2, .txt x1\)") as err:
        scan_dataset(tmp_path)
    assert "jpg" in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


@pytest.mark.parametrize("encoding,text,guess", [("cp1252", "café, naïve", "Windows-1252"),
                                                 ("gbk", "红色, 女孩", "GBK")])
def test_non_utf8_caption_is_named_with_the_fix_and_the_image_keeps_its_fallback_caption(tmp_path, encoding, text,
                                                                                         guess):
    sub = tmp_path / "5_red girl"
    make_folder(sub, {"a": None, "b": "b tags"})
    write_text(sub / "a.txt", text, encoding=encoding)
    result = scan_dataset(tmp_path)
    assert captions_of(result)["a.png"] == ("red girl", "folder")  # the kohya folder name, not mojibake
    notes = [w for w in result.warnings if "not UTF-8" in w]
    assert len(notes) == 1 and "5_red girl/a.txt" in notes[0] and f"probably {guess}" in notes[0]
    assert "Re-save them as UTF-8" in notes[0]


def test_utf16_without_bom_is_decoded_and_named(tmp_path):
    make_folder(tmp_path, {"a": None, "b": None})
    (tmp_path / "a.txt").write_bytes("1girl, red hair".encode("utf-16-le"))
    (tmp_path / "b.txt").write_bytes("blue sky, 云".encode("utf-16-be"))
    result = scan_dataset(tmp_path)
    assert captions_of(result)["a.png"] == ("1girl, red hair", "sidecar")
    assert captions_of(result)["b.png"] == ("blue sky, 云", "sidecar")
    notes = [w for w in result.warnings if "not UTF-8" in w]
    assert len(notes) == 1 and "UTF-16 without a byte-order mark" in notes[0] and "a.txt, b.txt" in notes[0]


def test_utf16_and_utf8_bom_captions_are_read(tmp_path):
    make_folder(tmp_path, {"a": None, "b": None})
    write_text(tmp_path / "a.txt", "蓝色, 猫", encoding="utf-16")  # Python adds the BOM
    write_text(tmp_path / "b.txt", "\ufeffcat, blue")
    got = captions_of(scan_dataset(tmp_path))
    assert got["a.png"][0] == "蓝色, 猫" and got["b.png"][0] == "cat, blue"


def test_exif_rotation_and_alpha_on_white(tmp_path):
    make_image(tmp_path / "phone.jpg", (96, 48), exif_orientation=6)  # stored landscape, shown portrait
    (images, skipped) = scan_images(tmp_path)
    assert not skipped and (images[0].width, images[0].height) == (48, 96)
    assert load_image(tmp_path / "phone.jpg").size == (48, 96)
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)
    Image.new("LA", (40, 40), (0, 128)).save(tmp_path / "half.png")
    assert load_image(tmp_path / "half.png").getpixel((5, 5)) == (127, 127, 127)
    Image.new("I;16", (40, 40), 65535).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((5, 5)) == (255, 255, 255)
    for ext in ("webp", "bmp", "JPEG"):
        make_image(tmp_path / f"x.{ext}", (40, 40))
    assert {p.path.suffix for p in scan_images(tmp_path)[0]} >= {".webp", ".bmp", ".JPEG"}


def test_reduced_jpeg_decode_keeps_orientation_and_covers_the_target(tmp_path):
    img = Image.new("RGB", (800, 400), (255, 0, 0))
    img.paste((0, 0, 255), (400, 0, 800, 400))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top, blue below
    img.save(tmp_path / "big.jpg", exif=exif, quality=95)
    fast = load_image(tmp_path / "big.jpg", at_least=(90, 180))
    assert fast.size[0] >= 90 and fast.size[1] >= 180 and fast.size[0] < 400
    assert fast.size[1] == 2 * fast.size[0]
    top, bottom = fast.getpixel((fast.size[0] // 2, 5)), fast.getpixel((fast.size[0] // 2, fast.size[1] - 5))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
