"""A UNet loaded in fp8 (Load Diffusion Model with weight_dtype fp8_e4m3fn, ComfyUI's low-VRAM
setting) trains in place like any other MODEL: ComfyUI's ops cast each weight up as its layer runs,
the trainer never converts the host's weights, and the LoRA file lands in models/loras and loads."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_workflows import STYLE, cpu_sized, load_api, make_images, one, txt2img, ui_text

UNET = "sd15_unet_only.safetensors"


@pytest.fixture(scope="module")
def unet_file(comfy_server):
    """The test checkpoint's UNet as its own file in models/unet, as Load Diffusion Model reads it."""
    dst = comfy_server.path("models", "unet", UNET)
    if not os.path.exists(dst):
        prefix = "model.diffusion_model."
        with safe_open(comfy_server.path("models", "checkpoints", comfy_server.checkpoint), "pt") as f:
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        save_file(tensors, dst)
    return UNET


def fingerprint(server, after=None, nodes=None):
    """The fp8 MODEL's fingerprint (probe_nodes/), after `after` when given, in the graph `nodes`."""
    g = dict(nodes or {})
    g.setdefault("50", {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "fp8_e4m3fn"}})
    if not [k for k, v in g.items() if v["class_type"] == "CheckpointLoaderSimple"]:
        g["51"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint}}
    ckpt = one(g, "CheckpointLoaderSimple")
    g["52"] = {"class_type": "InplaceLoRATest_HostFingerprint",
               "inputs": {"model": ["50", 0], "clip": [ckpt, 1], "vae": [ckpt, 2], **({"after": after} if after else {})}}
    return g


def test_fp8_unet_from_load_diffusion_model_trains_and_its_lora_loads(comfy_server, unet_file):
    server = comfy_server
    first = server.wait(server.post_prompt(fingerprint(server)), timeout=600)
    before = json.loads(ui_text(first, "52"))["unet"]
    assert before["dtypes"].get("torch.float8_e4m3fn", 0) > 100, before["dtypes"]  # ComfyUI kept it in fp8
    make_images(server.path("input", "fp8_ds"))
    g = cpu_sized(load_api(STYLE), server.checkpoint, "fp8_ds", name="fp8_test")
    g = {k: v for k, v in g.items() if v["class_type"] in (
        "CheckpointLoaderSimple", "InplaceLoRA_LoadDataset", "InplaceLoRA_Trainer", "InplaceLoRA_SaveLoRA")}
    g["50"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_file, "weight_dtype": "fp8_e4m3fn"}}
    trainer = one(g, "InplaceLoRA_Trainer")
    g[trainer]["inputs"]["model"] = ["50", 0]  # CLIP and VAE still come from Load Checkpoint
    g[one(g, "InplaceLoRA_SaveLoRA")]["inputs"]["name"] = "tests/fp8_test"
    g.update(txt2img(server.checkpoint, "fp8_after", model=["50", 0], loader=one(g, "CheckpointLoaderSimple")))
    g = fingerprint(server, after=[trainer, 0], nodes=g)
    entry = server.wait(server.post_prompt(g), timeout=900)
    events = server.status_events(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(events.get("execution_error", events))[:3000]

    path = server.path("models", "loras", "tests", "fp8_test.safetensors")
    with safe_open(path, "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t).all() for t in ups)
    assert any(t.abs().sum() > 0 for t in ups)  # it trained on the fp8 UNet
    assert [n for n in os.listdir(server.path("output")) if n.startswith("fp8_after")]  # it still samples
    assert json.loads(ui_text(entry, "52"))["unet"] == before  # the host's fp8 UNet, untouched
