"""The tab: its callbacks (form -> request, live progress, stop, captions, presets), its layout and
wiring under a recording fake Gradio, the scripts/ entry file, and the same tab on Forge."""

import importlib.machinery
import runpy
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

import fake_gradio
from fake_models import FakeSD1
from fake_webui import load_model
from inplace_lora_a1111 import tab
from inplace_lora_a1111.job import JobManager

ROOT = Path(__file__).resolve().parents[2]


def form(**changes):
    values = dict(zip([k.field for k in tab.KNOBS], tab.knob_values(tab.DEFAULT)))
    values.update(output_name="tab", lora_rank=4, max_train_steps=2, resolution="64", batch_size=2,
                  save_every_n_epochs=0, sample_every_n_epochs=1, learning_rate=1e-3)
    values.update(changes)
    return [values[k.field] for k in tab.KNOBS]


def test_presets_fill_the_form():
    values = dict(zip([k.field for k in tab.KNOBS], tab.knob_values("sd15_style")))
    assert values["repeats"] == 10 and values["flip_aug"] is True and values["lora_rank"] == 16
    assert dict(zip([k.field for k in tab.KNOBS], tab.knob_values(tab.DEFAULT)))["repeats"] == 1
    assert "sdxl_style" in tab.preset_names()


def test_form_becomes_a_typed_request():
    request = tab.build_request(" /data ", "sks", "sd15_style", form(epochs=7.0, output_name=" "),
                                ["a cat", "0, 1", 4])
    assert request["train_data_dir"] == "/data" and request["preset"] == "sd15_style"
    assert request["epochs"] == 7 and isinstance(request["epochs"], int) and "output_name" not in request
    assert request["preview_prompt"] == "a cat" and request["preview_strengths"] == "0, 1"
    with pytest.raises(ValueError):
        tab.build_request("/data", "", "", [1, 2], [])


def test_train_button_streams_progress_to_the_end(webui, dataset):
    load_model(webui, FakeSD1(webui.shared.opts))
    manager = JobManager()
    updates = list(tab.on_train(str(dataset), "sks", tab.DEFAULT, *form(), "", "0, 0.8", 2,
                                manager=manager, poll=0.01))
    status, chart, gallery = updates[-1]
    assert status.startswith("**Done**") and "<lora:tab:0.8>" in status
    assert isinstance(chart, Image.Image)
    captions = [c for _, c in gallery]
    assert captions[-2:] == ["<lora:tab:0>", "<lora:tab:0.8>"] and captions[0].startswith("step 2: sks")
    assert len(updates) < 40  # polled every 10 ms for seconds, but only changes are sent


def test_train_button_explains_a_bad_folder(webui):
    updates = list(tab.on_train("/no/such", "", tab.DEFAULT, *form(), "", "", 20, manager=JobManager()))
    assert len(updates) == 1 and updates[0][0].startswith("**Not started:**") and "does not exist" in updates[0][0]


def test_stop_and_watch_when_idle(webui):
    manager = JobManager()
    assert tab.on_stop(manager) == "Nothing is training."
    assert [u[0] for u in tab.on_watch(manager=manager)] == ["No training yet."]


def test_caption_and_check_buttons(webui, dataset):
    assert "4 usable image(s)" in tab.on_check(str(dataset), "", tab.DEFAULT, *form())
    assert tab.on_caption(str(dataset / "missing"), "template", "skip", "").startswith("Not captioned:")
    summary = tab.on_caption(str(dataset), "template", "skip", "")
    assert "already captioned and kept" in summary


def _build(monkeypatch):
    gr = fake_gradio.make()
    monkeypatch.setitem(sys.modules, "gradio", gr)
    from inplace_lora_a1111 import webui_entry

    tabs = webui_entry.on_ui_tabs()
    return gr, tabs


def test_tab_layout_and_wiring(webui, monkeypatch):
    gr, tabs = _build(monkeypatch)
    assert [(title, elem) for _, title, elem in tabs] == [("LoRA Trainer", "inplace_lora_trainer")]
    by_fn = {e["fn"]: e for e in gr.events}
    train = by_fn[tab.on_train]
    assert len(train["inputs"]) == 3 + len(tab.KNOBS) + len(tab.PREVIEW_FIELDS)
    assert [c.kind for c in train["outputs"]] == ["Markdown", "Image", "Gallery"]
    assert by_fn[tab.on_watch]["outputs"] == train["outputs"] and by_fn[tab.on_stop]["inputs"] == []
    knobs = train["inputs"][3:3 + len(tab.KNOBS)]
    assert by_fn[tab.knob_values]["outputs"] == knobs  # choosing a preset refills every knob
    assert by_fn[tab.on_check]["inputs"] == train["inputs"][:3 + len(tab.KNOBS)]
    assert [k.kwargs["label"] for k in knobs] == [k.label for k in tab.KNOBS]


def test_forge_gets_the_same_tab(webui, monkeypatch):
    a1111, _ = _build(monkeypatch)
    forge = types.ModuleType("modules_forge")
    forge.__spec__ = importlib.machinery.ModuleSpec("modules_forge", None)
    monkeypatch.setitem(sys.modules, "modules_forge", forge)
    gr, _ = _build(monkeypatch)
    assert [c.kind for c in gr.created] == [c.kind for c in a1111.created]
    assert [getattr(e["fn"], "__qualname__", None) for e in gr.events] == [
        getattr(e["fn"], "__qualname__", None) for e in a1111.events]


def test_scripts_file_registers_a_tab_and_routes(webui):
    runpy.run_path(str(ROOT / "scripts" / "inplace_lora_trainer.py"))
    assert len(webui.script_callbacks.ui_tabs) == 1 and len(webui.script_callbacks.app_started) == 1
    namespace = runpy.run_path(str(ROOT / "scripts" / "inplace_lora_trainer.py"))
    assert not any(isinstance(v, type) and v.__name__ == "Script" for v in namespace.values())
