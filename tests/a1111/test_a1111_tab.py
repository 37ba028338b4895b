"""The tab: its callbacks (form -> request, live progress, stop, resume, captions, presets), its layout
and wiring under a recording fake Gradio, the scripts/ entry file, and the same tab on Forge."""

import importlib.machinery
import runpy
import sys
import types
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from PIL import Image

import fake_gradio
from fake_models import FakeSD1
from fake_webui import install_safe_loading, load_model, stop_training_at
from inplace_lora_a1111 import tab
from inplace_lora_a1111.job import JobManager
from inplace_lora_a1111.lossplot import render_loss_plot

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


def test_name_field_starts_empty_so_the_folder_name_applies(webui, monkeypatch):
    values = dict(zip([k.field for k in tab.KNOBS], tab.knob_values(tab.DEFAULT)))
    assert values["output_name"] == ""  # not "my_lora" under a label that says "empty: the folder's name"
    assert "output_name" not in tab.build_request("/data", "", tab.DEFAULT, tab.knob_values(tab.DEFAULT), [])
    gr, _ = _build(monkeypatch)
    name = next(c for c in gr.created if c.kwargs.get("label", "").startswith("LoRA name"))
    assert name.kwargs["value"] == "" and "folder's name" in name.kwargs["placeholder"]


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


def _stopped_in_the_tab(webui, dataset, monkeypatch, manager):
    load_model(webui, FakeSD1(webui.shared.opts))
    release = stop_training_at(monkeypatch, webui, 2)
    updates = list(tab.on_train(str(dataset), "", tab.DEFAULT, *form(max_train_steps=50), "", "0, 0.8", 2,
                                manager=manager, poll=0.01))
    release()
    return updates[-1][0]


def test_resume_button_continues_the_stopped_run_under_safe_loading(webui, dataset, monkeypatch):
    refused = install_safe_loading(monkeypatch, webui)
    manager = JobManager()
    stopped = _stopped_in_the_tab(webui, dataset, monkeypatch, manager)
    assert stopped.startswith("**Stopped**") and "step 2/50" in stopped
    assert "To continue this run, press Resume (same name and settings)." in stopped  # the tab's button
    assert "resume\\_from\\_checkpoint" not in stopped and "resume_from_checkpoint" not in stopped
    updates = list(tab.on_resume(str(dataset), "", tab.DEFAULT, *form(max_train_steps=4), "", "0, 0.8", 2,
                                 manager=manager, poll=0.01))
    status = updates[-1][0]
    assert status.startswith("**Done**: tab") and "step 4/4" in status and "resumed from" in status
    assert refused == []


def test_resume_button_says_what_to_press(webui, dataset, monkeypatch):
    manager = JobManager()
    updates = list(tab.on_resume(str(dataset), "", tab.DEFAULT, *form(), "", "", 2, manager=manager))
    assert len(updates) == 1 and updates[0][0].startswith("**Not resumed:** there is no stopped run named 'tab'")
    assert "press Train to start a new run" in updates[0][0]
    _stopped_in_the_tab(webui, dataset, monkeypatch, manager)
    changed = list(tab.on_resume(str(dataset), "", tab.DEFAULT, *form(max_train_steps=4, lora_rank=8), "", "", 2,
                                 manager=manager, poll=0.01))[-1][0].replace("\\", "")  # Markdown escapes
    assert "**Error:** cannot resume: these settings differ from the stopped run's ('Rank' (lora_rank): 4 -> 8)" \
        in changed
    assert "Put them back and press Resume again, or press Train to start a new run." in changed


def test_status_shows_lora_tags_and_paths_literally():
    status = {"status": "done", "lora_name": "uitest", "running": False, "lora_file": "/m/Lora/uitest.safetensors",
              "messages": ["saved /m/Lora/uitest.safetensors; use <lora:uitest:0.8> in a prompt",
                           "prompt *cat* [x]_y_"]}
    html = MarkdownIt("commonmark").render(tab.format_status(status))  # Gradio renders CommonMark
    assert "use &lt;lora:uitest:0.8&gt; in a prompt" in html and "<a href" not in html
    assert "prompt *cat* [x]_y_" in html


def test_engine_messages_name_the_forms_fields():
    message = ("request: lora_rank must be a whole number, got 'x'. network_weights points to '/x', which does "
               "not exist. Fix the path in the config (or --set network_weights=...).")
    assert tab.for_tab(message) == ("request: 'Rank' (lora_rank) must be a whole number, got 'x'. network_weights "
                                    "points to '/x', which does not exist. Fix the path in the form.")


def test_loss_chart_keeps_its_own_size_and_title_in_view(webui, monkeypatch):
    chart = render_loss_plot([(s, 1 / s) for s in range(3, 40)])
    assert chart.size == (768, 384)  # drawn at its size: no squashed text
    gr, _ = _build(monkeypatch)
    image = next(c for c in gr.created if c.kind == "Image")
    assert image.kwargs["show_label"] is False  # Gradio's label badge would sit on the chart's title


def test_matplotlib_chart_where_the_webui_has_it():
    """A1111 and Forge ship matplotlib, so the tab draws its chart with it (tests/requirements.txt has it)."""
    import matplotlib  # noqa: F401  (tests/requirements.txt: the WebUIs ship it, so the tab draws with it)
    from inplace_lora_a1111.lossplot import _matplotlib_chart

    chart = _matplotlib_chart([5, 6], [1.57, 1.31])
    assert chart.size == (768, 384) and chart.mode == "RGB"
    assert len(set(chart.getdata())) > 50  # lines, text and anti-aliasing drawn, not a blank canvas


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
    resume = by_fn[tab.on_resume]
    assert resume["inputs"] == train["inputs"] and resume["outputs"] == train["outputs"]
    assert resume["source"].kwargs["value"] == "Resume"
    loads = [e for e in gr.events if e["event"] == "load"]  # a reloaded page reattaches by itself
    assert [(e["fn"], e["outputs"]) for e in loads] == [(tab.on_watch, train["outputs"])]
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
