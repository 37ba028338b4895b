"""`python -m engine demo`: a real training run in about a minute on a laptop CPU, with nothing to download.

It writes a small built-in dataset (procedural stripe images with captions), trains a LoRA on the
built-in tiny SD1-structured model through exactly the path a real run takes (dataset scan, buckets,
latent and text caches, the loop, checkpoints, the kohya writer), then renders the same prompts at
strength 0 and 0.8 side by side. The tiny model is small enough to train on a CPU, so its images show
the LoRA's effect, not a real checkpoint's quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_PROMPTS = ["ohwx stripes, red and blue", "ohwx stripes, green"]


def write_dataset(folder: Path, n: int = 8, size: int = 64) -> Path:
    """Stripe patterns in a few colours, captioned the way a user would caption them."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    colours = [("red and blue", (220, 40, 40), (40, 60, 220)), ("green", (40, 180, 60), (230, 230, 230))]
    for i in range(n):
        name, a, b = colours[i % len(colours)]
        period = 6 + 2 * (i // len(colours))
        mask = ((x + (i % 3) * y) // period) % 2
        arr = np.where(mask[..., None] == 1, np.array(a), np.array(b)).astype("uint8")
        Image.fromarray(arr).save(folder / f"stripes_{i:02d}.png")
        (folder / f"stripes_{i:02d}.txt").write_text(f"stripes, {name}", encoding="utf-8")
    return folder


def demo_main(argv: list[str]) -> int:
    from .config import TrainConfig
    from .lora.kohya_io import read_lora, to_network_keys
    from .lora.targets import build_network
    from .models import tiny_sd1
    from .progress import ConsoleProgress
    from .sample import strength_grid
    from .train import train

    parser = argparse.ArgumentParser(prog="python -m engine demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output", help="where output/demo/ is written")
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    args = parser.parse_args(argv)

    root = Path(args.output_dir) / "demo"
    data = write_dataset(root / "dataset")
    model = tiny_sd1(seed=0)
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(root), output_name="demo_lora", resolution="64",
                      trigger_word="ohwx", batch_size=4, max_train_steps=args.steps, learning_rate=3e-3,
                      target_modules="locon", train_text_encoder=True, text_encoder_lr=1e-3,
                      save_every_n_epochs=0, save_steps=max(1, args.steps // 2), flip_aug=True)
    started = time.time()
    progress = ConsoleProgress()
    try:
        result = train(cfg, model, callbacks=[progress])
    finally:
        progress.close()

    network = build_network(model, cfg)
    tensors, _ = read_lora(result.lora_path)
    network.load_kohya_state_dict(to_network_keys(network, tensors)[0])
    columns = []
    for strength in (0.0, 0.8):
        with network.applied(multiplier=strength):
            columns.append(model.sample(DEMO_PROMPTS, seed=7, steps=20, cfg=5.0, width=64, height=64))
    grid = strength_grid([[im.resize((192, 192), Image.NEAREST) for im in col] for col in columns],
                         ["strength 0", "strength 0.8"])
    grid_path = root / "demo_grid.png"
    grid.save(grid_path)
    print(f"\ntrained {result.steps} steps in {time.time() - started:.0f} s "
          f"(loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})\n"
          f"LoRA:    {result.lora_path}\n"
          f"grid:    {grid_path} (left: strength 0, right: strength 0.8)\n"
          f"dataset: {data}")
    return 0
