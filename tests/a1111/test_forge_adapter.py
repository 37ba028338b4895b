"""The Forge adapter on fake forge objects (fake_forge.py) of both lineages: Forge 2.x / Neo ("backend":
Forge's own Linear, text-processing engines, sigma predictor) and reForge / Classic ("ldm_patched":
ComfyUI-port patcher, A1111's conditioning). Training through the engine leaves every weight, flag and
class exactly as it was, the file has the keys the A1111 and ComfyUI paths write, and what a fork cannot
do is refused with one line."""

import pytest
import torch
from torch import nn

from engine.errors import ModelError
from engine.lora.kohya_io import read_lora
from engine.train import train
import fake_forge
from fake_forge import ForgeLinear, forge_model
from fake_models import FakeSD1, FakeSDXL
from inplace_lora_a1111 import forge_host, host
from inplace_lora_a1111.adapter import A1111Model
from inplace_lora_a1111.forge_adapter import ForgeModel
from inplace_lora_a1111.hostkit import state_fingerprint
from inplace_lora_a1111.linear_views import linear_views
from test_a1111_adapter import config

LINEAGES = ["backend", "ldm_patched"]


@pytest.fixture(params=LINEAGES)
def forge(request, webui, monkeypatch):
    return request.param, fake_forge.install(monkeypatch, webui, request.param,
                                             "2.0.1v1.10.1" if request.param == "backend" else "1.0.0v2-v1.10.1RC")


def snapshot(sd):
    """Values, inference flags, requires_grad, classes, hooks and forwards of every trained module."""
    roots = [sd.forge_objects.unet.model.diffusion_model, *sd.forge_objects.clip.cond_stage_model.children()]
    with torch.inference_mode():
        values = [t.clone() for r in roots for t in [*r.parameters(), *r.buffers()]]
    return values, state_fingerprint(roots), [type(m) for r in roots for m in r.modules()]


def same(a, b):
    return len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


def test_fork_is_named_from_what_it_ships(webui, monkeypatch):
    fake_forge.install(monkeypatch, webui, "backend")
    assert forge_host.fork() == forge_host.ForgeFork("Forge", "backend", "2.0.1v1.10.1")
    assert host.is_forge()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_in_place_leaves_the_forge_model_as_it_was(forge, webui, dataset, tmp_path, family):
    lineage, fork = forge
    sd = forge_model(webui, family, lineage)
    unet = sd.forge_objects.unet.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters())
    assert (lineage == "backend") == any(isinstance(m, ForgeLinear) for m in unet.modules())
    before = snapshot(sd)
    cfg = config(dataset, tmp_path, train_text_encoder=True, gradient_checkpointing=True)
    result = train(cfg, host.trainable_model(sd))
    assert same(snapshot(sd), before)  # bit-identical inference tensors, same flags and classes
    assert not any(isinstance(m, nn.Linear) for m in unet.modules() if isinstance(m, ForgeLinear))
    assert fork.memory.loads and fork.memory.loads[0][0] is sd.forge_objects.unet  # loaded the fork's way
    assert webui.shared.opts.data == {"emphasis": "Original", "CLIP_stop_at_last_layers": 1}
    tensors, meta = read_lora(result.lora_path)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    prefixes = ["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"]
    for prefix in prefixes + ["lora_unet_"]:
        ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and sum(bool(u.abs().sum() > 0) for u in ups) > len(ups) // 2, prefix  # it learned
    assert any("attn1_to_q" in k for k in tensors)  # Forge's own Linears carry LoRA too


@pytest.mark.parametrize("family, make", [("sd1", FakeSD1), ("sdxl", FakeSDXL)])
def test_kohya_keys_are_the_a1111_paths_own(forge, webui, family, make):
    from engine.config import TrainConfig
    from engine.lora.targets import build_network

    lineage, _ = forge
    model = ForgeModel(forge_model(webui, family, lineage))
    with model.session(False, True):
        ours = set(build_network(model, TrainConfig(train_text_encoder=True)).loras)
    a1111 = set(build_network(A1111Model(make(webui.shared.opts)), TrainConfig(train_text_encoder=True)).loras)
    assert ours == a1111


def test_captions_are_literal_and_clip_skip_applies_for_the_run(webui, monkeypatch):
    fake_forge.install(monkeypatch, webui, "backend")
    sd = forge_model(webui, "sd1", "backend")
    model = ForgeModel(sd, clip_skip=2)
    with model.session(False, False), torch.no_grad():
        cond = model.encode_text(["a (cat:1.3)"])
    assert sd.text_processing_engine.seen == [("None", 2)]
    assert sd.text_processing_engine.clip_skip == 1 and webui.shared.opts.data["emphasis"] == "Original"
    assert cond["context"].shape[1] == 77 and not cond["context"].is_inference()


def test_the_sdxl_vector_is_pooled_then_size_ids(forge, webui):
    lineage, _ = forge
    sd = forge_model(webui, "sdxl", lineage)
    model = ForgeModel(sd)
    with torch.no_grad():
        cond = model.encode_text(["a cat", "a dog"])
        assert cond["pooled"].shape == (2, 32) and cond["context"].shape == (2, 77, 64)
        ids = torch.tensor([[64.0, 96.0, 0, 0, 64, 96]] * 2)
        y = model._sdxl_y({**cond, "time_ids": ids}, 2, 64, 96)
    assert torch.equal(y[:, 32:], ids) and torch.equal(y[:, :32], cond["pooled"])


def test_latents_and_schedule_come_from_the_fork(forge, webui):
    from diffusers import DDPMScheduler

    lineage, _ = forge
    sd = forge_model(webui, "sd1", lineage)
    model = ForgeModel(sd)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    objective = model.objective()
    assert torch.allclose(objective.alphas_cumprod, ref, atol=1e-6) and objective.prediction_type == "epsilon"
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = model.encode_images(pixels)
    vae = sd.forge_objects.vae.first_stage_model
    with torch.no_grad():
        assert torch.allclose(latents, vae.encode(pixels).latent_dist.mean * 0.18215, atol=1e-5)
    assert not latents.is_inference()


def test_linear_views_are_put_back_after_an_error():
    with torch.inference_mode():
        layer = ForgeLinear(nn.Linear(4, 3))
    root = nn.Sequential(layer)
    with pytest.raises(RuntimeError, match="boom"):
        with linear_views([root]) as n:
            assert n == 1 and isinstance(layer, nn.Linear) and isinstance(layer, ForgeLinear)
            assert torch.equal(layer(torch.ones(2, 4)), nn.functional.linear(torch.ones(2, 4), layer.weight,
                                                                               layer.bias))
            raise RuntimeError("boom")
    assert type(layer) is ForgeLinear and not isinstance(layer, nn.Linear)


def test_last_generations_lora_is_taken_off(forge, webui):
    lineage, fork = forge
    sd = forge_model(webui, "sd1", lineage)
    fork.networks.load_networks(["someone_elses"])
    assert sd.forge_objects.unet is not sd.forge_objects_original.unet
    assert host.unmerge_builtin_loras(sd) == ["someone_elses"]
    assert sd.forge_objects.unet is sd.forge_objects_original.unet and sd.current_lora_hash == "[]"
    assert fork.networks.load_lora_state_dict.cache_info().currsize == 0
    assert sd.forge_objects_original.unet.refreshed == 1  # backend LoraLoader restores its backups


@pytest.mark.parametrize("setup, words", [
    (lambda sd, fork: setattr(sd, "is_sd1", False), ["SD1.x, SD2.x and SDXL", "Flux"]),
    (lambda sd, fork: setattr(sd.forge_objects.unet.model, "storage_dtype", "nf4"), ["quantized", "nf4"]),
    (lambda sd, fork: setattr(fork.memory.vram_state, "name", "LOW_VRAM"), ["LOW_VRAM", "restart"]),
    (lambda sd, fork: setattr(sd.forge_objects.unet.model.diffusion_model, "in_channels", 9), ["inpainting"]),
])
def test_what_a_fork_cannot_train_is_refused_in_one_line(forge, webui, setup, words):
    lineage, fork = forge
    sd = forge_model(webui, "sd1", lineage)
    setup(sd, fork)
    reason = host.refusal(sd, train_text_encoder=False)
    assert reason and "\n" not in reason and all(w in reason for w in words), reason


def test_a_partly_loaded_unet_is_refused_before_any_weight_is_touched(forge, webui):
    lineage, fork = forge
    sd = forge_model(webui, "sd1", lineage)
    fork.memory.partial = True
    before = snapshot(sd)
    model = ForgeModel(sd)
    with pytest.raises(ModelError, match="only load part of the model"):
        with model.session(False, False):
            pass
    assert same(snapshot(sd), before)


def test_the_tabs_job_trains_on_forge_and_publishes_the_lora(forge, webui, dataset):
    from fake_webui import quick_request
    from inplace_lora_a1111 import api
    from inplace_lora_a1111.job import JobManager

    lineage, fork = forge
    sd = forge_model(webui, "sd1", lineage)
    fork.networks.load_networks(["last_one"])  # the user's last generation had a LoRA
    before = snapshot(sd)
    manager = JobManager()
    code, body = api.handle_train(quick_request(dataset, train_text_encoder=True, max_train_steps=2), manager)
    assert code == 200, body
    manager.job.thread.join(300)
    status = manager.status()
    assert status["status"] == "done" and status["error"] is None, status
    assert status["lora_file"] == webui.shared.cmd_opts.lora_dir + "/tiny.safetensors"
    assert status["card_preview"].endswith("tiny.preview.png")
    assert any("un-merged the LoRA(s) of the last generation" in m and "last_one" in m for m in status["messages"])
    assert webui.processing.prompts[-1] == "stripes 0, (pattern) <lora:tiny:0.8>"
    assert fork.networks.refreshed[0] >= 1 and sd.current_lora_hash == "[]"
    assert same(snapshot(sd), before)
