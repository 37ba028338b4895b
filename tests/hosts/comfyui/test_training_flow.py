"""The product's main path on a real ComfyUI (CPU, random full-size SD1.5 weights, 64 px, fp32):
train from the example workflow, save into models/loras, load the file with ComfyUI's LoraLoader,
compare strengths, Cancel mid-run, resume, fail inside a run.

The host model is fingerprinted (probe_nodes/) before and after runs: every weight bit for bit, and
per tensor requires_grad / inference-tensor / dtype / device, module train flags, hooks and instance
`forward`s. Runs of the trainer alone (cancelled, resumed to the end, failed; the text encoder trained
too) must leave all of it unchanged. A graph that also samples with the LoRA through ComfyUI is
compared the same way, tensor by tensor, except for the one change ComfyUI's own LoRA patching makes
with no trainer involved, which the control graph in `comfy_own_patching` measures on each version
(host_diff.lora_rewrapped says which code; 0.3.75 and 0.8.0 make it, 0.33.0 does not).
"""
import json
import os
import time

import numpy as np
import pytest
from safetensors import safe_open

from host_diff import changes, lora_rewrapped, summary
from comfy_workflows import (CAPTION, STYLE, cancel_after_a_step, checkpoint_steps, cpu_sized, fingerprint_graph,
                             load_api, make_images, one, saved_image, txt2img, ui_text)


def run(server, graph, timeout=900):
    return server.wait(server.post_prompt(graph), timeout=timeout)


def succeeded(server, entry):
    events = server.status_events(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(events.get("execution_error", events))[:3000]
    return entry


@pytest.fixture(scope="module")
def fingerprint(comfy_server):
    def take(detail=False):
        g = fingerprint_graph(comfy_server.checkpoint)
        g["201"]["inputs"]["detail"] = detail  # per tensor and module, for a comparison that names what changed
        return json.loads(ui_text(succeeded(comfy_server, run(comfy_server, g)), "201"))
    return take


@pytest.fixture(scope="module")
def host_before(fingerprint):
    """The host model as CheckpointLoaderSimple gave it, before any training in this session."""
    return fingerprint(detail=True)


@pytest.fixture(scope="module")
def style_run(comfy_server, host_before):
    """The 'train a style LoRA and compare strengths' example at CPU size, text encoder trained too,
    plus a plain KSampler image with Preview LoRA Strengths' settings."""
    server = comfy_server
    make_images(server.path("input", "style_ds"))
    g = cpu_sized(load_api(STYLE), server.checkpoint, "style_ds", name="style_test", train_text_encoder=True)
    g[one(g, "InplaceLoRA_SaveLoRA")]["inputs"]["name"] = "tests/style_test"
    preview = one(g, "InplaceLoRA_PreviewStrengths")
    g[preview]["inputs"].update(prompt="stripes", negative="", strengths="0, 1", seed=5)
    g["90"] = {"class_type": "SaveImage", "inputs": {"images": [preview, 1], "filename_prefix": "strength_cells"}}
    g.update(txt2img(server.checkpoint, "base_image", loader=one(g, "CheckpointLoaderSimple")))
    t0 = time.monotonic()
    entry = succeeded(server, run(server, g))
    return {"graph": g, "entry": entry, "seconds": time.monotonic() - t0,
            "trainer": one(g, "InplaceLoRA_Trainer"), "save": one(g, "InplaceLoRA_SaveLoRA")}


def test_training_writes_a_kohya_lora_into_models_loras(comfy_server, style_run):
    path = comfy_server.path("models", "loras", "tests", "style_test.safetensors")
    assert os.path.isfile(path), os.listdir(comfy_server.path("models", "loras"))
    assert os.path.isfile(path[: -len(".safetensors")] + ".preview.png"), "no preview PNG beside the LoRA"
    assert os.stat(path).st_mode & 0o044, "the LoRA file is not readable by other users"
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "style_test"
    assert meta["ss_steps"] == "2" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    text = ui_text(style_run["entry"], style_run["save"])
    assert "<lora:style_test:0.8>" in text and "tests/style_test.safetensors" in text
    checkpoints = comfy_server.path("output", "lora_trainer", "style_test")
    assert os.path.isfile(os.path.join(checkpoints, "style_test.safetensors"))
    with open(os.path.join(checkpoints, "style_test.config.yaml"), encoding="utf-8") as f:
        assert "sample_steps: 2\n" in f.read(), "the node's preview_steps did not reach the previews"


def test_the_dataset_report_plans_the_trainers_steps(style_run):
    report = ui_text(style_run["entry"], one(style_run["graph"], "InplaceLoRA_LoadDataset"))
    plan = next(line for line in report.splitlines() if line.startswith("Plan:"))
    assert "= 2 steps" in plan and "set on the LoRA Trainer" in plan, plan


def test_loss_and_preview_reach_the_node_and_survive_a_reload(comfy_server, style_run):
    run_info = comfy_server.get_json(f"/inplace_lora/history?node={style_run['trainer']}")
    assert run_info["status"] == "done" and run_info["prompt_id"] == style_run["entry"]["prompt"][1]
    assert [p[0] for p in run_info["points"]] == [1, 2]
    assert all(np.isfinite(p[1]) and p[2] > 0 for p in run_info["points"])
    preview = run_info["preview"]
    png = comfy_server.get_bytes(f"/view?filename={preview['filename']}&subfolder={preview['subfolder']}&type=temp")
    assert png[:4] == b"\x89PNG"
    loss_node = [k for k, v in style_run["graph"].items() if v["class_type"] == "PreviewImage"][0]
    assert style_run["entry"]["outputs"][loss_node]["images"], "the loss plot was not shown"
    summary = ui_text(style_run["entry"], style_run["trainer"])
    print(f"LoRA Trainer said:\n{summary}\nwhole prompt: {style_run['seconds']:.1f} s")  # pytest -rP shows it
    assert "s/step" in summary and "text encoder" in summary


def test_strength_zero_column_is_the_base_model_and_strength_one_differs(comfy_server, style_run):
    entry = style_run["entry"]
    base = saved_image(comfy_server, entry, "106")
    cells = entry["outputs"]["90"]["images"]
    assert len(cells) == 2
    from PIL import Image

    zero, full = (np.asarray(Image.open(comfy_server.path("output", c["subfolder"], c["filename"]))) for c in cells)
    assert np.array_equal(zero, base), "strength 0 must give exactly the base model's image"
    assert not np.array_equal(full, base), "strength 1 of the trained LoRA changed nothing"


@pytest.fixture(scope="module")
def host_after_style_run(style_run, fingerprint):
    """Taken straight after the style run, before any other graph: a prompt without the host's loader
    (the control below) makes ComfyUI's cache drop the loaded checkpoint (0.8.0:
    comfy_execution/caching.py:172 `_clean_cache` keeps only the running prompt's nodes), so a later
    fingerprint would be of a fresh load, not of the model the trainer used; a fresh load differs
    from the first in `clip_l.transformer.text_projection.weight`, which SD1.5 files do not hold and
    ComfyUI leaves as uninitialised memory. `changes` fails on a reload (another object id)."""
    return fingerprint(detail=True)


@pytest.fixture(scope="module")
def comfy_own_patching(comfy_server, sd15_checkpoint, host_after_style_run):
    """The control for the comparison below: a fresh copy of the checkpoint (another file name, so
    ComfyUI loads it again), LoraLoader + KSampler on it, no trainer anywhere; (before, after)."""
    server = comfy_server
    ckpt = server.link_checkpoint(sd15_checkpoint, "sd15_control_copy.safetensors")
    probe = fingerprint_graph(ckpt)
    probe["201"]["inputs"]["detail"] = True
    before = json.loads(ui_text(succeeded(server, run(server, probe)), "201"))
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                      "strength_clip": 1.0, "lora_name": "tests/style_test.safetensors"}}}
    g.update(txt2img(ckpt, "control", model=["2", 0], clip=["2", 1], loader="1", seed=9))
    succeeded(server, run(server, g))  # each of these prompts holds the loader, so ComfyUI's cache keeps the model
    return before, json.loads(ui_text(succeeded(server, run(server, probe)), "201"))


def test_host_unchanged_after_training_and_lora_sampling(host_after_style_run, host_before, comfy_own_patching):
    """Every weight bit for bit and every flag, tensor by tensor, except requires_grad of exactly the
    weights ComfyUI's own LoRA patching re-wraps in the control (no trainer there): the style graph
    samples with the LoRA through ComfyUI on the host too (Preview LoRA Strengths), which does the same
    to the same weights. The trainer's own share is compared with nothing excused in the runs below."""
    explained, _ = lora_rewrapped(changes(*comfy_own_patching))
    found = changes(host_before, host_after_style_run)
    unexplained = {k: v for k, v in found.items() if explained.get(k) != v}
    print(f"compared everything but requires_grad True -> False of the {len(explained)} weights ComfyUI's LoRA "
          f"patching re-wraps; of those, the host shows {len(found) - len(unexplained)}")  # pytest -rP
    assert not unexplained, summary(unexplained)


def test_comfy_lora_patching_itself_changes_nothing_else(comfy_own_patching):
    """The control: ComfyUI's LoraLoader + KSampler on a fresh copy changes nothing but what
    `lora_rewrapped` explains; anything else is a new ComfyUI behaviour to trace (trace_flags.py)."""
    _, rest = lora_rewrapped(changes(*comfy_own_patching))
    assert not rest, summary(rest)


def test_comfy_loraloader_loads_the_file_cleanly_and_changes_the_image(comfy_server, style_run):
    server = comfy_server
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint}},
         "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": "tests/style_test.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}}}
    g.update(txt2img(server.checkpoint, "loraloader", model=["2", 0], clip=["2", 1], loader="1"))
    log_start = len(server.log_text())
    entry = succeeded(server, run(server, g))
    log = server.log_text()[log_start:]
    assert "lora key not loaded" not in log, log[-3000:]
    assert not np.array_equal(saved_image(server, entry, "106"), saved_image(server, style_run["entry"], "106"))


@pytest.fixture(scope="module")
def cancelled(comfy_server, style_run, fingerprint):
    """A 40-step run cancelled with /interrupt once it has trained a step; the text encoder is trained
    too, so the host checks after it and its resume cover the text encoder's path with nothing excused."""
    server = comfy_server
    g = cpu_sized(load_api(STYLE), server.checkpoint, "style_ds", name="cancel_test", steps=40,
                  target_layers="attention", preview_prompt="", train_text_encoder=True)
    g = {k: v for k, v in g.items() if v["class_type"] in ("CheckpointLoaderSimple", "InplaceLoRA_LoadDataset",
                                                          "InplaceLoRA_Trainer", "PreviewImage")}
    trainer = one(g, "InplaceLoRA_Trainer")
    before = fingerprint()
    entry, step = cancel_after_a_step(server, g, trainer)
    return {"graph": g, "entry": entry, "step_at_cancel": step, "trainer": trainer, "before": before}


def test_cancel_stops_within_two_steps_and_keeps_a_checkpoint(comfy_server, cancelled):
    assert "execution_interrupted" in comfy_server.status_events(cancelled["entry"])
    steps = checkpoint_steps(comfy_server, "cancel_test")
    assert steps, "no checkpoint after Cancel"
    assert cancelled["step_at_cancel"] <= steps[-1] <= cancelled["step_at_cancel"] + 2
    info = comfy_server.get_json(f"/inplace_lora/history?node={cancelled['trainer']}")
    assert info["status"] == "stopped"
    assert "switch on `resume` on the LoRA Trainer node" in info["message"], info["message"]
    assert "resume_from_checkpoint" not in info["message"], info["message"]


def test_host_model_unchanged_after_cancel(cancelled, fingerprint):
    assert fingerprint() == cancelled["before"]


def test_resume_continues_from_the_checkpoint_and_a_finished_run_leaves_the_host_unchanged(
        comfy_server, cancelled, fingerprint):
    done = checkpoint_steps(comfy_server, "cancel_test")[-1]
    g = json.loads(json.dumps(cancelled["graph"]))
    g[cancelled["trainer"]]["inputs"].update(resume=True, steps=done + 1)
    before = fingerprint()
    entry = succeeded(comfy_server, run(comfy_server, g))
    assert fingerprint() == before
    text = ui_text(entry, cancelled["trainer"])
    assert "resumed from" in text and f"{done + 1} steps" in text, text
    info = comfy_server.get_json(f"/inplace_lora/history?node={cancelled['trainer']}")
    assert [p[0] for p in info["points"]] == list(range(1, done + 2)), "the chart lost the steps before the resume"
    assert info["resumed_at"] == done


def test_a_run_that_fails_inside_training_leaves_the_host_unchanged(comfy_server, cancelled, fingerprint):
    g = json.loads(json.dumps(cancelled["graph"]))
    g[cancelled["trainer"]]["inputs"].update(resume=True, rank=8, steps=100)
    before = fingerprint()
    entry = run(comfy_server, g)
    error = comfy_server.status_events(entry).get("execution_error", {})
    assert "cannot resume" in error.get("exception_message", "") and "lora_rank" in error["exception_message"]
    assert fingerprint() == before


def test_next_prompt_samples_exactly_as_before_training(comfy_server, style_run, cancelled):
    entry = succeeded(comfy_server, run(comfy_server, txt2img(comfy_server.checkpoint, "after_all")))
    assert np.array_equal(saved_image(comfy_server, entry, "106"), saved_image(comfy_server, style_run["entry"], "106"))


def test_caption_then_train_example_uses_the_new_lora_in_the_same_graph(comfy_server, style_run):
    server = comfy_server
    folder = make_images(server.path("input", "10_char_ds"), captions=False, seed=3)
    g = cpu_sized(load_api(CAPTION), server.checkpoint, "10_char_ds", name="caption_test", steps=1,
                  preview_prompt="")
    entry = succeeded(server, run(server, g))
    captions = ui_text(entry, one(g, "InplaceLoRA_AutoCaption"))
    assert "img0.png: a photo of mychar, char ds" in captions, captions
    assert not [f for f in os.listdir(folder) if f.endswith(".txt")], "write_txt_files=False wrote sidecars"
    sampler = one(g, "SaveImage")
    assert saved_image(server, entry, sampler).shape == (64, 64, 3)
    assert os.path.isfile(server.path("models", "loras", "my_character.safetensors"))
