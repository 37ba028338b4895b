"""The harness itself works: a real ComfyUI loads the random SD1.5 checkpoint and samples.

If these fail, every other real-ComfyUI test is meaningless, so they say what broke.
"""
import os
import time

import numpy as np
from PIL import Image


def txt2img_graph(ckpt, steps=2, seed=1, size=64, prefix="smoke"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_core_and_training_nodes_are_registered(comfy_server):
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "KSampler", "LoraLoader", "VAEEncode", "TrainLoraNode"):
        assert node in info, f"{node} missing from /object_info; see {comfy_server.log_path}"
    assert comfy_server.checkpoint in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_random_sd15_checkpoint_samples_a_64px_image(comfy_server):
    pid = comfy_server.post_prompt(txt2img_graph(comfy_server.checkpoint))
    entry = comfy_server.wait(pid, timeout=600)
    events = comfy_server.status_events(entry)
    assert entry["status"]["status_str"] == "success", events.get("execution_error", events)
    assert "model_type EPS" in comfy_server.log_text(), "checkpoint was not detected as an SD1.5 (EPS) model"

    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    img = np.asarray(Image.open(comfy_server.path("output", images[0]["subfolder"], images[0]["filename"])))
    assert img.shape == (64, 64, 3)
    assert img.std() > 1.0, "decoded image is constant: random weights were not initialised"


def test_interrupt_stops_a_running_sampler(comfy_server):
    pid = comfy_server.post_prompt(txt2img_graph(comfy_server.checkpoint, steps=200, seed=2, prefix="interrupted"))
    deadline = time.monotonic() + 120
    while pid not in comfy_server.running_prompt_ids():
        assert time.monotonic() < deadline, "prompt never started running"
        time.sleep(0.2)
    time.sleep(2)
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=120)
    events = comfy_server.status_events(entry)
    assert "execution_interrupted" in events, events
    assert not [f for f in os.listdir(comfy_server.path("output")) if f.startswith("interrupted")]
