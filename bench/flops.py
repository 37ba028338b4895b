"""Model FLOPs of one training step per image, counted by `torch.utils.flop_counter` on the meta device.

The step is the workload's: UNet forward and backward with LoRA rank 16 on kohya's default targets,
frozen base (gradients w.r.t. activations and LoRA weights only), no checkpointing (so recompute is not
counted: this is model FLOPs, the same useful work for every tool). Meta tensors carry shapes only,
so this runs on any CPU in seconds. Results are cached in bench/flops.json per torch version.

    python -m bench.flops            # prints and caches both workloads
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import ALPHA, RANK, WORKLOADS

CACHE = Path(__file__).resolve().parent / "flops.json"


def count(model: str, batch: int = 1) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import TrainConfig
    from engine.lora.targets import build_network
    from engine.models.tiny import full_size_model

    w = WORKLOADS[model]
    m = full_size_model(w["family"])
    net = build_network(m, TrainConfig(lora_rank=RANK, lora_alpha=ALPHA)).to("meta")
    net.attach()
    with torch.device("meta"):
        lat = torch.randn(batch, 4, w["latent"], w["latent"], dtype=torch.bfloat16)
        t = torch.randint(0, 1000, (batch,))
        cond = {"context": torch.randn(batch, 77, w["context"], dtype=torch.bfloat16)}
        if w["pooled"]:
            s = w["resolution"]
            cond["pooled"] = torch.randn(batch, w["pooled"], dtype=torch.bfloat16)
            cond["time_ids"] = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32).repeat(batch, 1)
    m.unet.requires_grad_(False).to(torch.bfloat16)
    net.to(torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with counter:
        out = m.predict(lat, t, cond)
        out.float().pow(2).mean().backward()
    net.detach()
    return counter.get_total_flops() / batch


def count_flux(model: str) -> float:
    """Flux has no engine model yet: its model FLOPs counted from the layer shapes the way
    flop_counter counts a step (forward 2 per MAC; backward: input gradients of the frozen Linears,
    both attention products' gradients, input and weight gradients of the LoRAs on kohya's 304 layers)."""
    from engine.models.flux_tiny import FLUX1_DEV, flux_linear_shapes

    w = WORKLOADS[model]
    img, txt = (w["resolution"] // 16) ** 2, w["tokens"]
    tokens = {"img_in": img, "txt_in": txt, "final_layer.linear": img}
    lin = lora = 0
    for name, (o, i) in flux_linear_shapes(FLUX1_DEV).items():
        if name.startswith("double_blocks"):
            n = 1 if "_mod." in name else (img if ".img_" in name else txt)
        elif name.startswith("single_blocks"):
            n = 1 if ".modulation." in name else img + txt
        else:
            n = tokens.get(name, 1)
        lin += n * o * i
        if "_blocks." in name:
            lora += n * RANK * (o + i)
    attn = (FLUX1_DEV.depth + FLUX1_DEV.depth_single) * 2 * (img + txt) ** 2 * FLUX1_DEV.hidden
    return 2 * (lin + attn + lora) + 2 * lin + 4 * attn + 4 * lora


def flops_per_image(model: str) -> float:
    import torch

    key = f"{model}@torch{torch.__version__.split('+')[0]}"
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key not in cache:
        cache[key] = count_flux(model) if WORKLOADS[model]["family"] == "flux1" else count(model)
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return cache[key]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for name in WORKLOADS:
        print(f"{name}: {flops_per_image(name) / 1e12:.3f} TFLOP per image per step")
