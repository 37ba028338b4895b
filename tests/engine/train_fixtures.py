"""A small patterned dataset and helpers for the end-to-end training tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import TrainConfig
from engine.options import EngineOptions

# the fast step (everything the CUDA graph replays) run without the graph, on the CPU
FAST_ON_CPU = EngineOptions(fast_step_without_graph=True)


def pattern_dataset(folder: Path, n: int = 4, size: int = 64) -> Path:
    """n distinct stripe images with captions; enough structure for a LoRA to learn quickly."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        arr = np.stack([np.sin(x / (3 + i)) * 127 + 128, np.cos(y / (4 + i)) * 127 + 128,
                        np.full((size, size), 60 * i)], -1).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes {i}", encoding="utf-8")
    return folder


def tiny_diffusers_folder(folder: Path, seed: int = 3) -> Path:
    """The tiny SD1 model saved as a diffusers folder (what a user's base_model folder looks like)."""
    from diffusers import StableDiffusionPipeline

    from engine.models import tiny_sd1

    model = tiny_sd1(seed=seed)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=model._sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def quick_config(data: Path, out: Path, **changes) -> TrainConfig:
    base = dict(train_data_dir=str(data), output_dir=str(out), output_name="test_lora", resolution="64",
                batch_size=2, max_train_steps=4, learning_rate=1e-3, save_every_n_epochs=0, save_precision="fp32")
    base.update(changes)
    return TrainConfig(**base)


def eval_loss(model, folder: Path, n: int = 4) -> float:
    """Noise-prediction error on fixed latents, noise and timesteps: comparable before/after training."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(folder / f"img{i}.png"))).permute(2, 0, 1).float()
                          / 127.5 - 1 for i in range(n)])
    with torch.no_grad():
        latents = model.encode_images(pixels)
        cond = model.encode_text([f"stripes {i}" for i in range(n)])
        objective = model.objective()
        total = 0.0
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            steps = torch.full((n,), t)
            pred = model.predict(objective.add_noise(latents, noise, steps), steps, cond)
            total += float(((pred - noise) ** 2).mean())
    return total / 5


def model_fingerprint(model) -> dict:
    """Everything a host would notice: values, dtypes, devices, requires_grad, modes, hooks, forwards."""
    out = {}
    for root_name, root in (("unet", model.unet), ("vae", model.vae),
                            *((f"te{i}", te) for i, te in enumerate(model.text_encoders))):
        h = hashlib.sha256()
        for name, t in root.state_dict().items():
            h.update(name.encode())
            h.update(str((t.dtype, t.device, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out[root_name] = h.hexdigest()
        out[root_name + ".grad"] = tuple(p.requires_grad for p in root.parameters())
        out[root_name + ".mode"] = tuple(m.training for m in root.modules())
        out[root_name + ".hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
        out[root_name + ".forward"] = sum("forward" in m.__dict__ for m in root.modules())
    return out
