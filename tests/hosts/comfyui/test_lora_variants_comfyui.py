"""LoHa, LoKr and DoRA in a real ComfyUI 0.3.75.

1. ComfyUI's loader on our files (variants_probe.py, no server): every key used, every module patched,
   each patched weight = base + strength x our update (strength 1 and 0.5), strength 0 = the base bit
   for bit; LoRA, LoHa, LoKr (full and low-rank factors) and DoRA on UNet Linear, 1x1 and 3x3 conv and
   text-encoder layers.
2. The user's path on the server: the LoRA Trainer node trains each variant (`network_type` in its
   `advanced` box) on the random full-size SD1.5, Save LoRA writes it, LoraLoader loads it with no
   "lora key not loaded" and the image changes; Preview LoRA Strengths' strength-0 column is the
   base image; the host model is left exactly as it was.
"""
import json

import numpy as np
import pytest

from comfy_workflows import (STYLE, cpu_sized, fingerprint_graph, load_api, make_images, one, run_probe, saved_image,
                             txt2img, ui_text)

VARIANTS = ("loha", "lokr", "dora")


@pytest.fixture(scope="module")
def probe(comfy_python):
    return run_probe(comfy_python, "variants_probe.py")


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "lokr_factor", "dora"])
def test_comfyui_loader_applies_our_update_exactly(probe, kind):
    r = probe[kind]
    assert not r["not_loaded"] and not r["comfy_errors"] and not r["errors"], r
    assert r["patched"] == r["modules"] == r["compared"] == 290, r  # locon layers + text encoder
    assert r["worst_relative_error"] < 1e-4, r
    assert r["strength0_exact"], r


def test_probe_covers_both_lokr_forms(probe):
    assert {"lokr_w1", "lokr_w2"} <= set(probe["lokr"]["kinds"])
    assert {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"} <= set(probe["lokr_factor"]["kinds"])


def _run(server, graph, timeout=1800):
    entry = server.wait(server.post_prompt(graph), timeout=timeout)
    events = server.status_events(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(events.get("execution_error", events))[:3000]
    return entry


@pytest.fixture(scope="module")
def trained(comfy_server):
    """Each variant trained by the LoRA Trainer node (2 steps, CPU size) and saved into models/loras."""
    server = comfy_server
    before = json.loads(ui_text(_run(server, fingerprint_graph(server.checkpoint)), "201"))
    make_images(server.path("input", "variants_ds"))
    style = cpu_sized(load_api(STYLE), server.checkpoint, "variants_ds", name="variants", preview_prompt="")
    keep = ("CheckpointLoaderSimple", "InplaceLoRA_LoadDataset")
    graph = {k: v for k, v in style.items() if v["class_type"] in keep}
    trainer, save = one(style, "InplaceLoRA_Trainer"), one(style, "InplaceLoRA_SaveLoRA")
    for i, kind in enumerate(VARIANTS):
        t, s = str(300 + 2 * i), str(301 + 2 * i)
        graph[t] = json.loads(json.dumps(style[trainer]))
        graph[t]["inputs"].update(name=f"variant_{kind}", target_layers="locon")
        graph[t]["inputs"]["advanced"] += f"\nnetwork_type: {kind}"
        graph[s] = json.loads(json.dumps(style[save]))
        graph[s]["inputs"].update(lora=[t, 0], name=f"tests/variant_{kind}", overwrite=True)
    _run(server, graph)
    after = json.loads(ui_text(_run(server, fingerprint_graph(server.checkpoint)), "201"))
    return {"before": before, "after": after}


def test_training_each_variant_leaves_the_host_model_unchanged(trained):
    assert trained["after"] == trained["before"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_loraloader_loads_the_variant_cleanly_and_changes_the_image(comfy_server, trained, kind):
    server = comfy_server
    from safetensors import safe_open

    path = server.path("models", "loras", "tests", f"variant_{kind}.safetensors")
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert any(k.endswith({"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[kind]) for k in keys)
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint}},
         "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": f"tests/variant_{kind}.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}}}
    g.update(txt2img(server.checkpoint, f"variant_{kind}", model=["2", 0], clip=["2", 1], loader="1"))
    g.update(txt2img(server.checkpoint, f"variant_base_{kind}", loader="1", start=120))
    log_start = len(server.log_text())
    entry = _run(server, g)
    log = server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "ERROR" not in log, log[-3000:]
    with_lora, base = saved_image(server, entry, "106"), saved_image(server, entry, "126")
    assert not np.array_equal(with_lora, base)


@pytest.mark.parametrize("kind", VARIANTS)
def test_strength_zero_column_is_the_base_image(comfy_server, trained, kind):
    server = comfy_server
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint}},
         "2": {"class_type": "InplaceLoRA_LoadLoRA", "inputs": {"lora_name": f"tests/variant_{kind}.safetensors"}},
         "3": {"class_type": "InplaceLoRA_PreviewStrengths",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora": ["2", 0], "prompt": "stripes",
                          "negative": "", "strengths": "0, 1", "seed": 5, "steps": 2, "cfg": 1.0, "width": 64,
                          "height": 64, "sampler_name": "euler", "scheduler": "normal"}},
         "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": f"cells_{kind}"}}}
    g.update(txt2img(server.checkpoint, f"zero_base_{kind}", loader="1"))
    entry = _run(server, g)
    cells = [np.asarray(im) for im in _saved_images(server, entry, "4")]
    base = saved_image(server, entry, "106")
    assert np.array_equal(cells[0], base)
    assert not np.array_equal(cells[1], base)


def _saved_images(server, entry, node):
    from PIL import Image

    return [Image.open(server.path("output", i["subfolder"], i["filename"])) for i in entry["outputs"][node]["images"]]
