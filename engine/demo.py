"""`python -m engine demo`: a real training run in about a minute on a laptop CPU, with nothing to download.

The built-in demo model (`engine/models/demo_model.py`, a tiny SD1-structured model trained by our
own script) draws circles, squares and triangles in five colours, but has never seen stripes. The
demo writes a small dataset of striped shapes captioned "a red circle with ohwx stripes on a white
background", trains a LoRA on them through exactly the path a real run takes (dataset scan, buckets,
latent and text caches, the loop, checkpoints, the kohya writer), then renders the same prompts with
the LoRA at strength 0, 0.8 and 1: solid shapes on the left, striped ones on the right.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .models.demo_shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, draw

STRIPES = "with ohwx stripes"
STRENGTHS = (0.0, 0.8, 1.0)
DEMO_PROMPTS = [caption("circle", "red", "white", STRIPES), caption("square", "blue", "white", STRIPES),
                caption("triangle", "yellow", "gray", STRIPES)]
SAMPLE_SEED, SAMPLE_CFG = 1, 3.0  # a toy model over-saturates at the guidance real checkpoints use
SCALE = 3  # 64 px pictures shown at 192 px, NEAREST so the pixels stay sharp
LABEL_WIDTH, LABEL_HEIGHT = 150, 16  # the prompt column on the left, the strength row on top


def write_dataset(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """Palette shapes filled with black horizontal stripes, captioned the way a user would caption them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape, colour, bg = SHAPES[i % 3], list(COLOURS)[i % 5], ("white", "gray")[i % 2]
        scene = Scene(shape, COLOURS[colour], BACKGROUNDS[bg], cx=32 + rng.uniform(-4, 4), cy=32 + rng.uniform(-4, 4),
                      r=rng.uniform(17, 22), stripes=((20, 20, 20), 90.0, 16.0))
        Image.fromarray(draw(scene)).save(folder / f"stripes_{i:02d}.png")
        (folder / f"stripes_{i:02d}.txt").write_text(caption(shape, colour, bg, STRIPES), encoding="utf-8")
    return folder


def stripiness(cell: np.ndarray) -> float:
    """How much the centre of a picture (one grid cell, `SCALE` times 64 px) changes from row to row:
    high for horizontal stripes, low for a solid shape (whose only row-to-row changes are its top and
    bottom edges). The demo's test and bench/quality.py score the LoRA's stripes with it."""
    size = 64 * SCALE
    lum = cell[size // 2 - 30:size // 2 + 30, size // 2 - 20:size // 2 + 20].mean(axis=(1, 2))
    return float(np.abs(np.diff(lum[::SCALE])).mean())


def label_rows(grid: Image.Image, prompts: list[str], row_h: int, top: int = LABEL_HEIGHT) -> Image.Image:
    """The grid with each row's prompt written to its left."""
    from PIL import ImageDraw

    out = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), "white")
    out.paste(grid, (LABEL_WIDTH, 0))
    draw_ = ImageDraw.Draw(out)
    for r, prompt in enumerate(prompts):
        words, lines = prompt.split(), [""]
        for word in words:
            lines[-1:] = [lines[-1] + " " + word] if len(lines[-1]) + len(word) < 24 else [lines[-1], word]
        draw_.multiline_text((4, top + r * row_h + row_h // 2 - 8 * len(lines)), "\n".join(s.strip() for s in lines),
                             fill="black", spacing=4)
    return out


def demo_main(argv: list[str]) -> int:
    from .config import TrainConfig
    from .lora.kohya_io import read_lora, to_network_keys
    from .lora.targets import build_network
    from .models.demo_model import demo_model
    from .progress import ConsoleProgress
    from .sample import strength_grid
    from .train import train

    parser = argparse.ArgumentParser(prog="python -m engine demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output", help="where output/demo/ is written")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400, about a minute)")
    args = parser.parse_args(argv)

    root = Path(args.output_dir) / "demo"
    data = write_dataset(root / "dataset")
    model = demo_model()
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(root), output_name="demo_lora", resolution="64",
                      trigger_word="ohwx", batch_size=4, max_train_steps=args.steps, learning_rate=5e-3,
                      lora_rank=16, lora_alpha=16, target_modules="locon", train_text_encoder=True,
                      text_encoder_lr=1e-3, save_every_n_epochs=0, save_steps=max(1, args.steps // 2), flip_aug=True)
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
    for strength in STRENGTHS:
        with network.applied(multiplier=strength):
            images = model.sample(DEMO_PROMPTS, seed=SAMPLE_SEED, steps=25, cfg=SAMPLE_CFG, width=64, height=64)
        columns.append([im.resize((64 * SCALE, 64 * SCALE), Image.NEAREST) for im in images])
    grid = strength_grid(columns, [f"strength {s:g}" + (" (base model)" if s == 0 else "") for s in STRENGTHS])
    grid = label_rows(grid, DEMO_PROMPTS, row_h=64 * SCALE)
    grid_path = root / "demo_grid.png"
    grid.save(grid_path)
    print(f"\ntrained {result.steps} steps in {time.time() - started:.0f} s "
          f"(loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})\n"
          f"LoRA:    {result.lora_path}\n"
          f"grid:    {grid_path} (columns: LoRA strength {', '.join(f'{s:g}' for s in STRENGTHS)}; the base model "
          f"draws plain shapes, the LoRA adds the stripes it learned)\n"
          f"dataset: {data}")
    return 0
