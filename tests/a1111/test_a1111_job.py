"""Training jobs through the API route handlers, on a fake WebUI with a tiny A1111-shaped model: what
lands in the Lora folder, what the WebUI's state shows, Stop, refusals, bad requests, and the live chart's
validation series (green, beside the training loss; the same chart as before without validation)."""

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fake_forge
from fake_forge import forge_model
from fake_models import FakeSD1
from fake_webui import install_safe_loading, load_model, quick_request, stop_training_at
from inplace_lora_a1111 import api, lossplot, tab
from inplace_lora_a1111.job import JobManager, TrainJob


@pytest.fixture
def sd1(webui):
    model = FakeSD1(webui.shared.opts)
    load_model(webui, model)
    return model


def run(manager, request):
    code, body = api.handle_train(request, manager)
    assert code == 200, body
    manager.job.thread.join(300)
    return manager.status()


def tensor_sha256(path):
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_train_route_publishes_the_lora_for_the_webui(webui, sd1, dataset):
    manager = JobManager()
    weights = {k: v.clone() for k, v in sd1.state_dict().items()}
    status = run(manager, quick_request(dataset, train_text_encoder=True))
    assert status["status"] == "done" and status["step"] == 3 and status["error"] is None
    lora = webui.shared.cmd_opts.lora_dir + "/tiny.safetensors"
    with safe_open(lora, "pt") as fh:
        meta = fh.metadata()
    assert status["lora_file"] == lora
    assert meta["ss_output_name"] == "tiny" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["sshs_model_hash"] == tensor_sha256(__import__("pathlib").Path(lora))  # A1111's "Lora hashes"
    assert status["card_preview"].endswith("tiny.preview.png")
    assert webui.processing.prompts[-2:] == ["stripes 0, (pattern)", "stripes 0, (pattern) <lora:tiny:0.8>"]
    assert webui.networks.refreshed[0] >= 1
    state = webui.shared.state
    assert state.begun == ["LoRA Trainer"] and state.ended == 1 and state.interrupted is False
    assert any("step 3/3" in t for t in state.textinfos)
    assert all(sd1.lock_held_in_predict)  # no generation could run on the model mid-step
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert all(torch.equal(weights[k], v) for k, v in sd1.state_dict().items())
    assert all(p.requires_grad for p in sd1.model.diffusion_model.parameters())
    second = run(manager, quick_request(dataset))
    assert second["lora_name"] == "tiny_2"  # never reuses a name the WebUI may have cached


def test_last_generations_lora_is_unmerged_before_training(webui, sd1, dataset):
    layer = sd1.model.diffusion_model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight += 1.0  # what the built-in Lora extension leaves merged after a generation
    layer.network_weights_backup, layer.network_current_names = original, (("old", 1, 1, None),)
    webui.networks.loaded_networks.append(object())
    status = run(JobManager(), quick_request(dataset))
    assert torch.equal(layer.weight, original) and webui.networks.loaded_networks == []
    assert any("un-merged" in m for m in status["messages"])


def test_stop_keeps_the_last_step_and_resume_continues_under_safe_loading(webui, sd1, dataset, monkeypatch):
    """A1111 checks every torch.load with its restricted unpickler (modules/safe.py, on by default): the
    checkpoint of a stopped run must resume under it."""
    refused = install_safe_loading(monkeypatch, webui)
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)  # as in torch 2.1.2, A1111 1.10's pin
    release = stop_training_at(monkeypatch, webui, 2)
    status = run(JobManager(), quick_request(dataset, max_train_steps=50))
    assert status["status"] == "stopped" and status["step"] == 2, status["error"]
    assert status["lora_file"].endswith("tiny-step00000002.safetensors")
    card = Path(webui.shared.cmd_opts.lora_dir) / "tiny-step00000002.preview.png"
    assert status["card_preview"] == str(card) and card.is_file()  # the stopped run's LoRA has a card image
    assert webui.processing.prompts[-1] == "stripes 0, (pattern) <lora:tiny-step00000002:0.8>"
    assert webui.shared.state.interrupted is False  # reset for the next generation
    checkpoint = Path(status["output_dir"]) / "checkpoints" / "step-00000002"
    assert status["messages"][-1] == (f"stopped at step 2; checkpoint kept in {checkpoint}. The LoRA of that step "
                                      f"is tiny-step00000002.safetensors in the Lora folder. To continue this run, "
                                      f'send the same request with "resume": true (same name and settings).')
    release()
    resumed = run(JobManager(), quick_request(dataset, max_train_steps=4, resume=True))
    assert resumed["status"] == "done" and resumed["step"] == 4, resumed["error"]
    assert any("resumed from" in m and "step 2" in m for m in resumed["messages"])
    assert resumed["lora_name"] == "tiny"  # same work folder; "tiny" is still free in the Lora folder
    assert refused == []
    code, body = api.handle_train(quick_request(dataset, resume=True), JobManager())
    assert code == 400 and "no stopped run named 'tiny'" in body["error"]  # that run has finished
    assert 'send the request without "resume"' in body["error"]


def test_an_old_state_pt_the_webui_refuses_gets_a_clear_message(webui, sd1, dataset, monkeypatch):
    """Checkpoints of earlier versions hold state.pt (a pickle); A1111's safe loading refuses what newer
    torch writes, and its torch.load returns None: the job says what to do instead of a TypeError."""
    from engine.checkpoint import read_state

    release = stop_training_at(monkeypatch, webui, 2)
    status = run(JobManager(), quick_request(dataset, max_train_steps=50))
    folder = Path(status["output_dir"]) / "checkpoints" / "step-00000002"
    torch.save(read_state(folder), folder / "state.pt")  # what an earlier version wrote
    (folder / "state.json").unlink()
    (folder / "state.safetensors").unlink()
    release()
    refused = install_safe_loading(monkeypatch, webui)
    resumed = run(JobManager(), quick_request(dataset, max_train_steps=4, resume=True))
    assert resumed["status"] == "error" and "TypeError" not in resumed["error"]
    assert "written by an earlier version" in resumed["error"] and "refused it" in resumed["error"]
    assert len(refused) == 1 and "state.pt" in refused[0]


def test_busy_and_stop_while_waiting_for_the_queue(webui, sd1, dataset):
    manager = JobManager()
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a txt2img is running
    try:
        assert api.handle_train(quick_request(dataset), manager)[0] == 200
        code, body = api.handle_train(quick_request(dataset), manager)
        assert code == 409 and "already training" in body["error"]
        assert api.handle_stop({}, manager) == (200, {"stopping": True})
        assert webui.shared.state.interrupted is False  # the user's generation is not interrupted
    finally:
        lock.release()
    manager.job.thread.join(60)
    assert manager.status()["status"] == "stopped"
    assert api.handle_stop({}, manager) == (200, {"stopping": False})


@pytest.mark.parametrize("change, message", [
    ({"train_data_dir": "/no/such/folder"}, "does not exist"),
    ({"train_data_dir": ""}, "choose the dataset folder"),
    ({"lora_rnk": 8}, "unknown key 'lora_rnk'. Did you mean 'lora_rank'"),
    ({"base_model": "/x.safetensors"}, "checkpoint the WebUI has loaded"),
    ({"preset": "nope"}, "preset 'nope' does not exist"),
    ({"preview_strengths": "0, strong"}, "preview strengths must be numbers"),
])
def test_bad_requests_are_answered_at_once(webui, sd1, dataset, change, message):
    code, body = api.handle_train(quick_request(dataset, **change), JobManager())
    assert code == 400 and message in body["error"]


def test_refused_setups_say_why(webui, sd1, dataset, monkeypatch):
    webui.shared.cmd_opts.lowvram = True
    code, body = api.handle_train(quick_request(dataset), JobManager())
    assert code == 400 and "--lowvram" in body["error"]
    webui.shared.cmd_opts.lowvram = False
    fake_forge.install(monkeypatch, webui, "backend")
    forge_model(webui, "sd1").is_sd1 = False  # what Forge loads for Flux
    code, body = api.handle_train(quick_request(dataset), JobManager())
    assert code == 400 and "Forge has a" in body["error"] and "Flux" in body["error"]


def test_routes_are_registered_and_answer_json(webui, sd1, dataset, monkeypatch):
    import sys
    import types

    class JSONResponse:
        def __init__(self, content, status_code=200):
            self.content, self.status_code = content, status_code

    fastapi = types.ModuleType("fastapi")
    fastapi.Body = lambda default=None: default
    responses = types.ModuleType("fastapi.responses")
    responses.JSONResponse = JSONResponse
    monkeypatch.setitem(sys.modules, "fastapi", fastapi)
    monkeypatch.setitem(sys.modules, "fastapi.responses", responses)
    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods):
            routes[(methods[0], path)] = endpoint

    from inplace_lora_a1111 import webui_entry

    webui_entry.on_app_started(None, App())  # demo is None under --nowebui
    assert set(routes) == {("POST", "/inplace-lora/v1/train"), ("POST", "/inplace-lora/v1/stop"),
                           ("GET", "/inplace-lora/v1/status"), ("GET", "/inplace-lora/v1/presets"),
                           ("POST", "/inplace-lora/v1/caption"), ("POST", "/inplace-lora/v1/check")}
    bad = routes[("POST", "/inplace-lora/v1/train")]({"train_data_dir": "/nowhere"})
    assert bad.status_code == 400 and "does not exist" in bad.content["error"]
    presets = routes[("GET", "/inplace-lora/v1/presets")]().content["presets"]
    assert presets["sd15_style"]["repeats"] == 10 and presets["Defaults"] == {}
    report = routes[("POST", "/inplace-lora/v1/check")](quick_request(dataset)).content["report"]
    assert "4 usable image(s)" in report


def test_caption_route_writes_template_captions_with_the_trigger(webui, tmp_path):
    from PIL import Image

    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 20, 20)).save(folder / f"red_car-{i}.png")
    code, body = api.handle_caption({"folder": str(folder), "captioner": "template", "trigger": "sks"})
    assert code == 200 and "2 captioned" in body["summary"]
    assert (folder / "red_car-0.txt").read_text(encoding="utf-8") == "a photo of sks, uncaptioned"
    code, body = api.handle_caption({"folder": str(folder), "captioner": "no-such-model"})
    assert code == 400 and "not found" in body["error"]


def test_status_is_safe_to_poll_from_another_thread(webui, sd1, dataset):
    manager = JobManager()
    seen = []
    api.handle_train(quick_request(dataset, max_train_steps=6), manager)
    poller = threading.Thread(target=lambda: [seen.append(manager.status()["step"]) for _ in range(200)])
    poller.start()
    manager.job.thread.join(300)
    poller.join()
    assert seen == sorted(seen) and manager.status()["step"] == 6


# --- the live chart's validation series (the tab draws it from the status) ---------------------------
def green(image) -> int:
    """Pixels of the validation series' green (matplotlib's #14963c, engine.plot's (20, 150, 60))."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - (20, 150, 60)).sum(-1) < 40).sum())


def test_validation_points_reach_the_status_and_the_live_chart(webui, sd1, dataset):
    manager = JobManager()
    status = run(manager, quick_request(dataset, max_train_steps=4, validation_split=0.25, validate_every_n_steps=2,
                                        validate_every_n_epochs=0))
    assert status["status"] == "done", status["error"]
    assert [s for s, _ in status["validation"]] == [2, 4]  # one point per validation, at its step
    assert all(np.isfinite(v) for _, v in status["validation"])
    _, chart, _ = tab.outputs(manager)
    plain = lossplot.render_loss_plot(status["losses"])
    assert chart.size == plain.size == (768, 384)
    assert green(chart) > 50 and green(plain) == 0  # the green series is drawn, and only where there is one


def test_without_validation_the_chart_is_unchanged(webui, sd1, dataset):
    manager = JobManager()
    status = run(manager, quick_request(dataset, max_train_steps=3))
    assert status["status"] == "done" and status["validation"] == []
    _, chart, _ = tab.outputs(manager)
    assert np.array_equal(np.asarray(chart), np.asarray(lossplot.render_loss_plot(status["losses"])))
    assert green(chart) == 0


def test_the_pillow_fallback_draws_the_validation_points_too(monkeypatch):
    def no_matplotlib(*args):
        raise ImportError("matplotlib")

    monkeypatch.setattr(lossplot, "_matplotlib_chart", no_matplotlib)
    losses = [(s, 1 / s) for s in range(1, 21)]
    with_points = lossplot.render_loss_plot(losses, [(10, 0.3), (20, 0.2)])
    assert green(with_points) > 20 and green(lossplot.render_loss_plot(losses)) == 0
    assert lossplot.render_loss_plot(losses, [(10, float("nan"))]) is not None  # a NaN point is left out
