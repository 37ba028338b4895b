"""What bench/quality.py measures on a LoRA file, the same way whichever tool wrote it.

Every tool's file is read into our network over a fresh demo model (engine/models/demo_model.py) and
scored there, so the measure cannot favour a trainer:
- validation loss: the model's v-prediction error on held-out striped pictures (not trained on), at
  fixed timesteps, each with its own fixed noise; the mean over pictures and timesteps;
- stripes: the demo's three prompts sampled with the LoRA at strength 1 (the demo's steps and CFG) and
  scored with the demo test's measure (`engine.demo.stripiness`), each prompt's score the mean over
  `samples` pictures (seeds from the demo's seed on; one picture is the demo test's own check); the
  concept is "reached" when at least two of the three prompts score more than twice the base model's
  score over the same seeds, the demo test's pass mark. One picture per prompt is a coarse measure: a
  single noise draw decides whether a half-learned concept shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import TrainConfig
from engine.demo import DEMO_PROMPTS, SAMPLE_CFG, SAMPLE_SEED, SCALE, stripiness
from engine.lora.kohya_io import read_lora, to_network_keys
from engine.lora.targets import build_network
from engine.lora.variants import check_file_type
from engine.model import preserve_module_state

VAL_TIMESTEPS = (50, 150, 300, 450, 600, 750, 900, 990)
VAL_SEED = 1234
SAMPLE_STEPS = 25


class Holdout:
    """Latents and text conditioning of the held-out pictures, encoded once."""

    def __init__(self, model, folder: Path):
        files = sorted(folder.glob("*.png"))
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
                              .permute(2, 0, 1) / 127.5 - 1 for f in files])
        captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]
        with torch.no_grad():
            self.latents = model.encode_images(pixels)
            self.cond = model.encode_text(captions)
        self.count = len(files)


@torch.no_grad()
def val_loss(model, holdout: Holdout) -> float:
    objective = model.objective()  # the loaded model's own (the demo model: DDPM, v-prediction)
    g = torch.Generator().manual_seed(VAL_SEED)
    total = 0.0
    for t in VAL_TIMESTEPS:
        noise = torch.randn(holdout.latents.shape, generator=g)
        steps = torch.full((holdout.count,), t)
        noised = objective.noised(holdout.latents, {"noise": noise, "t": steps})
        pred = model.predict(noised.noisy, noised.timestep, holdout.cond)
        total += float((pred.float() - noised.target).pow(2).mean())
    return total / len(VAL_TIMESTEPS)


@torch.no_grad()
def stripes(model, samples: int = 1) -> list[float]:
    """Each demo prompt's stripiness, the mean over `samples` pictures (seeds SAMPLE_SEED, SAMPLE_SEED + 1, ...).

    The pictures are `model.sample`'s (the same seeded noise per picture, sampler, steps and CFG), drawn
    in one batch: on the CPU a batch of twelve costs about what three single pictures do, and each
    picture's stripiness equals its single-picture one (checked to the printed digits on the demo model)."""
    pipe = model._pipeline()
    factor = pipe.vae_scale_factor
    seeds = [seed for seed in range(SAMPLE_SEED, SAMPLE_SEED + samples) for _ in DEMO_PROMPTS]
    cond = model.encode_text(DEMO_PROMPTS * samples)["context"]
    uncond = model.encode_text([""])["context"].expand_as(cond)
    noise = torch.cat([torch.randn((1, model.unet.config.in_channels, 64 // factor, 64 // factor),
                                   generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    with preserve_module_state(model.trainable_roots()):
        for root in model.trainable_roots():
            root.eval()
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=SAMPLE_STEPS,
                       guidance_scale=SAMPLE_CFG, height=64, width=64, latents=noise, output_type="latent").images
    scores = [stripiness(np.asarray(im.convert("RGB").resize((64 * SCALE, 64 * SCALE), Image.NEAREST),
                                    dtype=np.float32)) for im in model.decode_latents(latents)]
    return [float(np.mean(scores[i::len(DEMO_PROMPTS)])) for i in range(len(DEMO_PROMPTS))]


def reached(scores: list[float], base: list[float]) -> bool:
    return sum(s > 2 * b for s, b in zip(scores, base)) >= 2


def load_network(model, path: Path, network_type: str, target_modules="kohya"):
    """The file read into our network over `model`, every module of the network filled."""
    cfg = TrainConfig(network_type=network_type, target_modules=target_modules, lora_rank=1)
    tensors, _ = read_lora(path)
    check_file_type(cfg, tensors, path)
    network = build_network(model, cfg)
    renamed, ignored = to_network_keys(network, tensors)
    network.match_file(renamed)
    loaded, unused = network.load_kohya_state_dict(renamed)
    if len(loaded) != len(network) or ignored or unused:
        raise ValueError(f"{path}: {len(loaded)} of {len(network)} modules loaded; ignored {ignored[:3]}, "
                         f"unused {unused[:3]}")
    return network


def score(model, path: Path, network_type: str, holdout: Holdout, *, with_stripes: bool = True,
          samples: int = 1) -> dict:
    network = load_network(model, path, network_type)
    with network.applied():
        out = {"val_loss": val_loss(model, holdout)}
        if with_stripes:
            out["stripes"] = stripes(model, samples)
    return out
