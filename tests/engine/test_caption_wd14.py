"""WD14 ONNX tagger: a tiny ONNX model with the real input/output shapes, built here with onnx.helper.

The model's output depends on the mean of the *third* input channel, which is red only if the tagger
feeds BGR as the real models expect: a red image gets the probabilities in TAGS, anything else ~0.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from engine.caption import TagOptions, WD14Tagger, find_captioner_models, load_captioner  # noqa: E402
from engine.caption.cli import caption_main  # noqa: E402
from engine.data.captions import load_metadata  # noqa: E402
from engine.data.records import scan_dataset  # noqa: E402
from engine.errors import ModelError  # noqa: E402

# (name, category, probability for a red image)
TAGS = [
    ("general", 9, 0.10), ("sensitive", 9, 0.80), ("questionable", 9, 0.05), ("explicit", 9, 0.01),
    ("1girl", 0, 0.95), ("long_hair", 0, 0.50), ("^_^", 0, 0.60), ("hood_(pokemon)", 0, 0.40),
    ("solo", 0, 0.30), ("red_background", 0, 0.90), ("hatsune_miku", 4, 0.90), ("kagamine_rin", 4, 0.70),
    (">_<", 0, 0.36), (":d", 0, 0.34),
]
DEFAULT = "hatsune miku, 1girl, red background, ^_^, long hair, hood \\(pokemon\\), >_<"


def build_tagger(folder: Path, *, size=32, in_name="input", out_name="output", batch="N", stem="model",
                 tags=TAGS, csv_name="selected_tags.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = 0.01
    weights = np.zeros((3, len(TAGS)), np.float32)
    weights[2] = np.array([p for _, _, p in TAGS], np.float32) - base  # channel 2 of BGR = red
    nodes = [helper.make_node("ReduceMean", [in_name, "axes"], ["mean"], keepdims=0),
             helper.make_node("Div", ["mean", "k255"], ["unit"]),
             helper.make_node("MatMul", ["unit", "W"], ["logit"]),
             helper.make_node("Add", ["logit", "b"], [out_name])]
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array(255, np.float32), "k255"),
             numpy_helper.from_array(weights, "W"),
             numpy_helper.from_array(np.full((len(TAGS),), base, np.float32), "b")]
    graph = helper.make_graph(nodes, "tiny_tagger",
                              [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, size, size, 3])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, len(TAGS)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = folder / f"{stem}.onnx"
    onnx.save(model, str(path))
    with open(folder / csv_name, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _) in enumerate(tags):
            w.writerow([1000 + i, name, cat, 100])
    return path


def red(size=(40, 40)):
    return Image.new("RGB", size, (255, 0, 0))


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "wd14_tagger" / "wd-tiny-tagger"
    build_tagger(folder)
    return folder


def caption(tagger_dir, image, **opts):
    return WD14Tagger(tagger_dir, device="cpu", options=TagOptions(**opts)).caption([image])[0]


def test_default_formatting_order_and_thresholds(tagger_dir):
    # character first, then general tags by falling probability; 0.34/0.30 general and 0.70 character dropped;
    # underscores to spaces but kaomoji kept; parentheses escaped; no rating
    assert caption(tagger_dir, red()) == DEFAULT


def test_bgr_order_and_white_padding(tagger_dir):
    tagger = WD14Tagger(tagger_dir, device="cpu")
    assert tagger.size == 32
    assert tagger.caption([Image.new("RGB", (40, 40), (0, 0, 255))]) == [""]  # blue: nothing fires
    # a red strip padded to a square on white: the red channel mean stays high, the tags still come out
    arr = tagger.preprocess(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.float32
    assert arr[0, 0].tolist() == [255.0, 255.0, 255.0]  # corner is white padding
    assert arr[16, 16].tolist() == [0.0, 0.0, 255.0]  # centre is red, stored as BGR


def test_options(tagger_dir):
    assert caption(tagger_dir, red(), rating="first") == "sensitive, " + DEFAULT
    assert caption(tagger_dir, red(), rating="last") == DEFAULT + ", sensitive"
    assert caption(tagger_dir, red(), exclude="1girl, Red_Background") == \
        "hatsune miku, ^_^, long hair, hood \\(pokemon\\), >_<"
    assert caption(tagger_dir, red(), character_threshold=0.6).startswith("hatsune miku, kagamine rin, 1girl")
    assert caption(tagger_dir, red(), general_threshold=0.55) == "hatsune miku, 1girl, red background, ^_^"
    assert caption(tagger_dir, red(), replace_underscore=False) == \
        "hatsune_miku, 1girl, red_background, ^_^, long_hair, hood_\\(pokemon\\), >_<"
    assert "hood (pokemon)" in caption(tagger_dir, red(), escape_parentheses=False)
    assert caption(tagger_dir, red(), character_first=False).endswith(">_<, hatsune miku")
    assert caption(tagger_dir, red(), max_tags=2) == "hatsune miku, 1girl, red background"
    with pytest.raises(ValueError):
        TagOptions(general_threshold=1.5)


def test_v2_style_io_names_and_fixed_batch(tmp_path):
    folder = tmp_path / "v2"
    build_tagger(folder, size=48, in_name="input_1:0", out_name="predictions_sigmoid", batch=1)
    tagger = WD14Tagger(folder / "model.onnx", device="cpu", batch_size=8)
    assert (tagger.size, tagger.batch_size) == (48, 1)
    assert tagger.caption([red(), red((10, 10))]) == [DEFAULT, DEFAULT]


def test_gpu_provider_failure_falls_back_to_cpu(tagger_dir, monkeypatch):
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def broken(path, providers=None, **kw):
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA_PATH is set but CUDA wasn't able to be loaded")
        return real_session(path, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", broken)
    tagger = WD14Tagger(tagger_dir, device="auto")
    assert tagger.providers == ["CPUExecutionProvider"]
    assert "failed to start" in tagger.warnings[0] and "CPU" in tagger.warnings[0]
    assert tagger.caption([red()]) == [DEFAULT]


def test_gpu_failing_at_run_time_falls_back_to_cpu(tagger_dir, monkeypatch):
    real_session = ort.InferenceSession

    class FlakyGpu:
        def __init__(self, path, providers=None, **kw):
            self._s = real_session(path, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._s, name)

        def run(self, *a, **kw):
            raise RuntimeError("CUDNN_STATUS_NOT_INITIALIZED")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, providers=None, **kw: FlakyGpu(path) if "CUDAExecutionProvider" in providers
                        else real_session(path, providers=providers))
    tagger = WD14Tagger(tagger_dir, device="auto")
    assert tagger.caption([red()]) == [DEFAULT]
    assert any("continuing on the CPU" in w for w in tagger.warnings)


def test_missing_or_mismatched_files_say_what_is_expected(tmp_path, tagger_dir):
    with pytest.raises(ModelError, match="model.onnx"):
        WD14Tagger(tmp_path / "empty", device="cpu")
    lone = tmp_path / "lone"
    build_tagger(lone, stem="wd-x")
    (lone / "selected_tags.csv").unlink()
    with pytest.raises(ModelError, match="selected_tags.csv"):
        WD14Tagger(lone / "wd-x.onnx", device="cpu")
    short = tmp_path / "short"
    build_tagger(short, tags=TAGS[:5])
    with pytest.raises(ModelError, match="another model"):
        WD14Tagger(short, device="cpu")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00" * 10)
    (tmp_path / "garbage.csv").write_text("tag_id,name,category,count\n1,solo,0,5\n", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot load"):
        WD14Tagger(tmp_path / "garbage.onnx", device="cpu")


def test_discovery_of_both_layouts_by_name(tmp_path, tagger_dir):
    comfy = tmp_path / "ComfyUI" / "models" / "wd14_tagger"
    build_tagger(comfy, stem="wd-v1-4-moat-tagger-v2", csv_name="wd-v1-4-moat-tagger-v2.csv")  # pysssss layout
    hf = tmp_path / "ComfyUI" / "models" / "captioners" / "wd-eva02-large-tagger-v3"
    build_tagger(hf)  # HF download layout
    folders = [comfy, comfy.parent / "captioners"]
    names = {m.name: m.kind for m in find_captioner_models(folders)}
    assert names == {"wd-v1-4-moat-tagger-v2": "wd14", "wd-eva02-large-tagger-v3": "wd14"}
    tagger = load_captioner("wd-eva02-large-tagger-v3", folders, device="cpu")
    assert tagger.caption([red()]) == [DEFAULT]
    with pytest.raises(ModelError, match="Looked in") as err:
        load_captioner("wd-swinv2", folders)
    assert "wd-v1-4-moat-tagger-v2" in str(err.value)


def test_cli_writes_metadata_csv_that_training_reads(tmp_path, tagger_dir, capsys):
    ds = tmp_path / "my dataset 数据"
    (ds / "10_miku").mkdir(parents=True)
    red().save(ds / "10_miku" / "a.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(ds / "10_miku" / "b.jpg")
    rc = caption_main([str(ds), "--models-dir", str(tagger_dir.parent), "--model", "wd-tiny-tagger",
                       "--output", "metadata.csv", "--trigger", "mikustyle", "--exclude", "^_^"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "hatsune miku" in out and "mikustyle" in out  # the tag summary
    rows = load_metadata(ds / "metadata.csv")
    assert rows["10_miku/a.png"] == "mikustyle, " + DEFAULT.replace("^_^, ", "")
    assert rows["10_miku/b.jpg"] == "mikustyle"
    captions = {r.path.name: r.caption for r in scan_dataset(ds, min_image_size=1).records}
    assert captions == {"a.png": rows["10_miku/a.png"], "b.jpg": "mikustyle"}


def test_transparent_png_is_tagged_on_white(tagger_dir):
    tagger = WD14Tagger(tagger_dir, device="cpu")
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: white to the model
    assert tagger.preprocess(clear)[5, 5].tolist() == [255.0, 255.0, 255.0]
