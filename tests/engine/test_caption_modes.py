"""Captioning a folder: modes, trigger word, writers (.bak, atomic, encodings), CSV/JSONL round trip with
the dataset reader, cancel, corrupt images and the tag summary. Uses the template captioner (no model)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from engine.caption import CaptionOptions, TemplateCaptioner, caption_dataset, caption_images, load_captioner
from engine.caption.cli import caption_main
from engine.data.records import scan_dataset
from engine.errors import DatasetError, UserError


def make_dataset(root, names=("img0.png", "img1.png", "img2.png")):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64 + 8 * i), (40 * i, 90, 160)).save(root / name)
    return root


def run(folder, template="new, tag1, {name}", **opts):
    captioner = TemplateCaptioner(template)
    return caption_dataset(folder, captioner, CaptionOptions(**opts))


def read(path):
    return path.read_text(encoding="utf-8")


@pytest.fixture
def ds(tmp_path):
    root = make_dataset(tmp_path / "my set 猫")
    (root / "img0.txt").write_text("old caption, tag1", encoding="utf-8")
    (root / "img2.txt").write_text("", encoding="utf-8")  # an empty caption counts as none
    return root


def test_skip_keeps_existing_captions_and_fills_the_rest(ds):
    result = run(ds, mode="skip")
    assert read(ds / "img0.txt") == "old caption, tag1"
    assert not (ds / "img0.txt.bak").exists()
    assert read(ds / "img1.txt") == "new, tag1, img1"
    assert read(ds / "img2.txt") == "new, tag1, img2"
    assert [e.status for e in result.entries] == ["kept", "captioned", "captioned"]
    assert result.tag_counts()["tag1"] == 3  # the summary counts the captions the dataset now has
    assert "tag1" in result.summary() and "1 already captioned and kept" in result.summary()


@pytest.mark.parametrize("mode, expected", [
    ("overwrite", "new, tag1, img0"),
    ("append", "old caption, tag1, new, img0"),
    ("prepend", "new, img0, old caption, tag1"),
])
def test_modes_rewrite_with_backup(ds, mode, expected):
    run(ds, mode=mode)
    assert read(ds / "img0.txt") == expected
    assert read(ds / "img0.txt.bak") == "old caption, tag1"
    assert not list(ds.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_trigger_word_goes_first_and_is_not_duplicated(ds):
    (ds / "img1.txt").write_text("blue sky, sks", encoding="utf-8")
    run(ds, mode="append", trigger="sks")
    assert read(ds / "img0.txt") == "sks, old caption, tag1, new, img0"
    assert read(ds / "img1.txt") == "sks, blue sky, new, tag1, img1"


def test_dry_run_writes_nothing(ds):
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    result = run(ds, mode="overwrite", dry_run=True, output="csv")
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    assert result.captions[ds / "img0.png"] == "new, tag1, img0" and result.written == []


def test_encodings_utf16_bom_in_chinese_out(ds):
    (ds / "img1.txt").write_bytes("红色, 猫".encode("utf-16"))
    run(ds, template="新的, {name}", mode="append")
    assert (ds / "img1.txt").read_bytes() == "红色, 猫, 新的, img1".encode("utf-8")  # UTF-8, no BOM
    assert (ds / "img1.txt.bak").read_bytes() == "红色, 猫".encode("utf-16")


def test_unreadable_encoding_stops_before_writing(ds):
    (ds / "img1.txt").write_bytes("红色".encode("gbk"))
    with pytest.raises(DatasetError, match="UTF-8"):
        run(ds, mode="overwrite")
    assert read(ds / "img0.txt") == "old caption, tag1"


def test_csv_round_trip_with_the_dataset_reader(tmp_path):
    root = make_dataset(tmp_path / "10_sks")
    result = run(root.parent, template='say "hi", {name}', output="metadata.csv", trigger="sks")
    target = root.parent / "metadata.csv"
    assert result.written == [target]
    assert read(target).splitlines()[0] == '10_sks/img0.png,"sks, say ""hi"", img0"'
    records = scan_dataset(root.parent).records
    assert {r.path.name: (r.caption, r.caption_source) for r in records} == {
        f"img{i}.png": (f'sks, say "hi", img{i}', "metadata") for i in range(3)}
    run(root.parent, template="second, {name}", output="csv", mode="overwrite")
    assert read(target.with_name("metadata.csv.bak")).startswith('10_sks/img0.png,"sks, say')
    assert scan_dataset(root.parent).records[0].caption == "second, img0"


def test_csv_keeps_header_and_rows_of_other_images(ds):
    (ds / "metadata.csv").write_text("file_name,text\nimg0.png,from csv\ngone.png,a deleted image\n", encoding="utf-8")
    run(ds, output="csv", mode="skip")
    lines = read(ds / "metadata.csv").splitlines()
    assert lines[0] == "file_name,text"
    assert lines[1:] == ['img0.png,"from csv"', 'gone.png,"a deleted image"', 'img1.png,"new, tag1, img1"',
                         'img2.png,"new, tag1, img2"']


def test_jsonl_round_trip_keeps_extra_columns(ds):
    (ds / "metadata.jsonl").write_text(json.dumps({"file_name": "./img0.png", "text": "old", "score": 7}) + "\n",
                                       encoding="utf-8")
    run(ds, output="jsonl", mode="overwrite")
    rows = [json.loads(line) for line in read(ds / "metadata.jsonl").splitlines()]
    assert rows[0] == {"file_name": "./img0.png", "text": "new, tag1, img0", "score": 7}
    assert [r["file_name"] for r in rows[1:]] == ["img1.png", "img2.png"]
    assert {r.path.name: r.caption for r in scan_dataset(ds).records}["img2.png"] == "new, tag1, img2"


def test_sidecars_shadowed_by_metadata_are_warned_about(ds):
    (ds / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "x"}\n', encoding="utf-8")
    result = run(ds, mode="overwrite")
    assert any("metadata.jsonl" in w and "output=jsonl" in w for w in result.warnings)


def test_corrupt_image_is_reported_and_skipped(ds):
    (ds / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run(ds, mode="overwrite")
    assert any("broken.jpg" in w for w in result.warnings)
    assert not (ds / "broken.txt").exists() and read(ds / "img1.txt") == "new, tag1, img1"


def test_cancel_keeps_the_captions_already_made(tmp_path):
    root = make_dataset(tmp_path / "ds")
    captioner = TemplateCaptioner("{name}")
    captioner.batch_size = 1

    def progress(done, total, path):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption_dataset(root, captioner, CaptionOptions(output="csv"), progress=progress)
    assert read(root / "metadata.csv") == 'img0.png,"img0"\nimg1.png,"img1"\n'


def test_template_fields_and_errors(tmp_path):
    root = make_dataset(tmp_path / "5_red_car", names=("side-view_02.png",))
    cap = TemplateCaptioner("a photo of {trigger}, {folder}, {name}")
    assert cap.caption([None], [root / "side-view_02.png"]) == ["a photo of, red car, side view 02"]
    cap = TemplateCaptioner("a photo of {trigger}, {folder}", trigger="red car")
    assert cap.caption([None], [root / "x.png"]) == ["a photo of red car"]  # folder == trigger: not repeated
    with pytest.raises(UserError, match="unknown field"):
        TemplateCaptioner("{trigger} {colour}")
    assert caption_images([Image.new("RGB", (8, 8))], TemplateCaptioner("{name}"), trigger="t") == ["t, image 0000"]


def test_template_from_cli_and_bad_folder(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    assert caption_main(["--input", str(root), "--model", "template", "--trigger", "zz", "--output", "jsonl"]) == 0
    assert "zz" in capsys.readouterr().out
    assert json.loads(read(root / "metadata.jsonl").splitlines()[0]) == {"file_name": "img0.png",
                                                                          "text": "a photo of zz, ds"}
    assert caption_main([str(tmp_path / "missing"), "--model", "template"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        caption_main(["--help"])
    assert load_captioner("template").kind == "template"


def test_image_failing_to_decode_mid_run_is_reported_not_fatal(ds, monkeypatch, capsys):
    import engine.caption.run as run_module

    real = run_module.load_image

    def flaky(path, **kw):
        if path.name == "img1.png":
            raise DatasetError(f"'{path}' is damaged (broken data stream). Re-export it or remove it.")
        return real(path, **kw)

    monkeypatch.setattr(run_module, "load_image", flaky)
    monkeypatch.setattr(TemplateCaptioner, "needs_images", True)  # behave like a model that reads pixels
    rc = caption_main([str(ds), "--model", "template", "--template", "{name}", "--mode", "overwrite"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 failed" in out and "img1.png' is damaged" in out
    assert read(ds / "img2.txt") == "img2" and not (ds / "img1.txt").exists()
