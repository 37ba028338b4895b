"""The example workflows (API format) as the tests run them, shrunk to CPU size, plus small graphs.

Tests start from example_workflows/*.api.json, so a workflow that stops matching the nodes fails
here. `cpu_sized` keeps every node and link and only changes sizes: 64 px, 2 steps, rank 4, 2-step
sampling, fp32. Images are made in code (no fixtures to download).
"""
import copy
import json
import os
import subprocess
import time

import numpy as np
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "example_workflows")
STYLE = "train_style_lora_compare_strengths"
CAPTION = "caption_folder_then_train"
CPU_TRAINER = {"steps": 2, "epochs": 1, "rank": 4, "alpha": 0.0, "learning_rate": 0.01, "scheduler": "constant",
               "precision": "fp32", "gradient_checkpointing": True, "preview_every_n_steps": 0,
               "checkpoint_every_n_steps": 0, "preview_steps": 2, "advanced": "sample_cfg: 1.0"}


def load_api(name):
    with open(os.path.join(EXAMPLES, f"{name}.api.json"), encoding="utf-8") as f:
        return json.load(f)


def nodes_of(graph, class_type):
    return [k for k, v in graph.items() if v["class_type"] == class_type]


def one(graph, class_type):
    found = nodes_of(graph, class_type)
    assert len(found) == 1, f"expected one {class_type} in the graph, found {found}"
    return found[0]


def cpu_sized(graph, ckpt, folder, **trainer):
    """The same graph at CPU test size; `trainer` overrides LoRA Trainer inputs."""
    g = copy.deepcopy(graph)
    for node in g.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        elif kind == "InplaceLoRA_LoadDataset":
            inputs.update(folder=folder, resolution="64", buckets=False, repeats=1)
        elif kind == "InplaceLoRA_Trainer":
            inputs.update(CPU_TRAINER)
            inputs.update(trainer)
        elif kind == "InplaceLoRA_PreviewStrengths":
            inputs.update(width=64, height=64, steps=2, cfg=1.0)
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=2, cfg=1.0)
    return g


def txt2img(ckpt, prefix, *, model=None, clip=None, prompt="stripes", seed=5, start=100, loader=None):
    """Nodes (ids from `start`) that sample one 64 px image with the settings the tests give Preview
    LoRA Strengths; `loader` reuses an existing Load Checkpoint node instead of adding one."""
    s = str
    src = loader or s(start)
    model = model or [src, 0]
    clip = clip or [src, 1]
    nodes = {} if loader else {s(start): {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    return {
        **nodes,
        s(start + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}},
        s(start + 2): {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        s(start + 3): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        s(start + 4): {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [s(start + 1), 0], "negative": [s(start + 2), 0],
            "latent_image": [s(start + 3), 0], "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        s(start + 5): {"class_type": "VAEDecode", "inputs": {"samples": [s(start + 4), 0], "vae": [src, 2]}},
        s(start + 6): {"class_type": "SaveImage", "inputs": {"images": [s(start + 5), 0], "filename_prefix": prefix}},
    }


def fingerprint_graph(ckpt, start=200):
    s = str
    return {s(start): {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            s(start + 1): {"class_type": "InplaceLoRATest_HostFingerprint",
                           "inputs": {"model": [s(start), 0], "clip": [s(start), 1], "vae": [s(start), 2]}}}


def make_images(folder, n=3, size=64, captions=True, seed=0):
    """Small striped PNGs (distinct per image) with .txt captions."""
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.stack([(x * (i + 2) * 4) % 256, (y * 3 + seed * 40) % 256, ((x + y) * 2) % 256], -1)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"img{i}.png"))
        if captions:
            with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
                f.write(f"stripes, pattern {i}")
    return folder


def saved_image(server, entry, node):
    """The first image a SaveImage node wrote, as a uint8 array."""
    info = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.path("output", info["subfolder"], info["filename"])))


def ui_text(entry, node):
    return "\n".join(entry["outputs"][node]["text"])


def run_probe(comfy_python, script, *args, timeout=600):
    """Run a probe script of this folder with the ComfyUI venv's python and these arguments; its last
    stdout line as JSON."""
    out = subprocess.run([comfy_python, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
                          *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cancel_after_a_step(server, graph, trainer, timeout=600):
    """Post a training graph, press Cancel (/interrupt) once the LoRA Trainer node `trainer` reports a
    finished step; return (history entry, the step it had reported)."""
    pid = server.post_prompt(graph)
    deadline, step = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        info = server.get_json(f"/inplace_lora/history?node={trainer}")
        if info.get("prompt_id") == pid and info.get("step", 0) >= 1:
            step = info["step"]
            break
        assert pid in server.running_prompt_ids() or not server.history(pid), "run ended before a step"
        time.sleep(0.2)
    assert step >= 1, "training never reached step 1"
    server.interrupt()
    return server.wait(pid, timeout=timeout), step


def checkpoint_steps(server, name):
    """The steps of the resume checkpoints the run `name` kept under output/lora_trainer/."""
    root = server.path("output", "lora_trainer", name, "checkpoints")
    return sorted(int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("step-") and "." not in d)
