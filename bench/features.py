"""On the GPU: what each training feature of issue 19 costs per step, and that the CUDA-graph step
keeps covering it (SD1.5 or SDXL layout, random weights, no downloads; about 2 minutes on an H100).

    python -m bench.features [sd15|sdxl] [batch] [steps]
    python -m bench.features tiny 2 6        # CPU smoke run of the script (the tests' tiny SD1 model, 64 px)

For the baseline, each feature alone and all of them together (pyramid + input-perturbation noise,
masked loss, EMA of the weights, block-wise learning rates, a validation loss every 10 steps; tag
dropout separately, since it sends the step to the plain path by design) it trains `steps` steps in
bf16 and prints one line per variant: seconds per step over the steps after the fifth (host and GPU
together, up to the final loss read-back), how many steps the CUDA graph took, the peak memory, and
the validation values where there are any. Expected: every variant but tag dropout takes the graph
for all steps but the first two (warm-up and capture) and costs within a few percent of the baseline
(the validation variant pays its 4 extra forwards per held-out batch on the steps where it validates).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .common import ALPHA, RANK, SEED, device
from .workload import engine_model, image_folder

VARIANTS = {
    "baseline": {},
    "pyramid+ip noise": dict(multires_noise_iterations=6, ip_noise_gamma=0.1),
    "masked loss": dict(masked_loss=True),
    "ema": dict(ema_decay=0.999),
    "block lr": dict(down_lr_weight="sine", mid_lr_weight="0.5", up_lr_weight="cosine+.2"),
    "validation": dict(validation_split=0.25, validate_every_n_steps=10, validate_every_n_epochs=0),
    "all of them": dict(multires_noise_iterations=6, ip_noise_gamma=0.1, masked_loss=True, ema_decay=0.999,
                        down_lr_weight="sine", mid_lr_weight="0.5", up_lr_weight="cosine+.2",
                        validation_split=0.25, validate_every_n_steps=10, validate_every_n_epochs=0),
    "tag dropout (plain step)": dict(caption_tag_dropout_rate=0.2),
}


def _masks(folder: Path) -> None:
    """A left-half mask beside every other image (masked loss has something to do)."""
    from PIL import Image

    for i, image in enumerate(sorted(folder.glob("img*.png"))):
        if "_mask" in image.stem or i % 2:
            continue
        with Image.open(image) as img:
            w, h = img.size
        mask = Image.new("L", (w, h), 255)
        mask.paste(0, (0, 0, w // 2, h))
        mask.save(image.with_name(f"{image.stem}_mask.png"))


def _tiny_folder(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    for i in range(8):
        arr = np.stack([np.sin(x / (3 + i)) * 127 + 128, np.cos(y / (4 + i)) * 127 + 128,
                        np.full((64, 64), 30 * i)], -1).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"stripes {i}", encoding="utf-8")
    return folder


def run(model, folder: Path, out: Path, batch: int, steps: int, **opts) -> dict:
    import torch

    from engine.config import TrainConfig
    from engine.events import FunctionCallback
    from engine.train import train

    times: dict[int, float] = {}

    def on_event(event):
        if event.kind in ("step", "done"):
            times[event.step if event.kind == "step" else -1] = time.monotonic()

    cfg = TrainConfig(train_data_dir=str(folder), output_dir=str(out), output_name="features", batch_size=batch,
                      max_train_steps=steps, lora_rank=RANK, lora_alpha=ALPHA, mixed_precision="bf16",
                      save_every_n_epochs=0, seed=SEED, learning_rate=1e-4, device=device(), **opts)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, model, callbacks=[FunctionCallback(on_event)])
    timed = max(1, steps - 5)
    return dict(s_per_step=(times[steps] - times[5]) / timed, graph_steps=result.fast_steps,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, validation=result.validation,
                last_loss=result.losses[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else 4
    steps = max(6, int(argv[2]) if len(argv) > 2 else 30)
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    if name == "tiny":
        from engine.models import tiny_sd1

        folder, model = _tiny_folder(root / "images_tiny"), tiny_sd1()
    else:
        folder, model = image_folder(root, name), engine_model(name)
    _masks(folder)
    base = None
    for label, opts in VARIANTS.items():
        r = run(model, folder, root / label.replace(" ", "_"), batch, steps, **opts)
        base = base or r["s_per_step"]
        val = ", ".join(f"{s}: {v:.4f}" for s, v in r["validation"]) or "-"
        print(f"{name} b{batch} {label:26s} {r['s_per_step'] * 1000:7.1f} ms/step ({r['s_per_step'] / base:5.2f}x) "
              f"graph {r['graph_steps']}/{steps}  peak {r['peak_gib']:.2f} GiB  last loss {r['last_loss']:.4f}  "
              f"validation {val}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
