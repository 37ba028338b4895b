"""Does torch.compile (inductor) give the LoRA gradients eager PyTorch gives, on this machine?

    python -m bench.compile_check [tiny|sd15|sdxl|sd15-fp8|sdxl-fp8 ...]

For each model it attaches rank-16 LoRA on kohya's layers (up weights drawn non-zero, so every
gradient is), computes one loss's gradients eagerly and through `torch.compile`, and prints per LoRA
tensor the cosine between the two gradients (worst and median) and the largest relative difference.
Correct kernels give cosines of 1.0000 in fp32 and above 0.99 in bf16; a wrong kernel gives cosines
near 0 for every layer upstream of it. `tiny` is the CPU tests' model in fp32, `sd15`/`sdxl` the
benchmark's full-size UNets in bf16 at batch 2. It prints one JSON line per model. Why it exists:
torch 2.13's CPU inductor returns wrong gradients through diffusers' ResnetBlock2D + Upsample2D
(cosines near 0), so `torch_compile` runs on CUDA only and is checked there with this. A `-fp8` name
runs both with `fp8_compute` on (engine/models/fp8_compute.py): the compiled fp8 step against the
eager fp8 step.
"""

from __future__ import annotations

import json
import statistics
import sys


def check(name: str) -> dict:
    import contextlib

    import torch

    from engine.config import TrainConfig
    from engine.lora.targets import build_network
    from engine.models.fp8_compute import fp8_compute

    name, fp8 = name.removesuffix("-fp8"), name.endswith("-fp8")

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "tiny":
        from engine.models import tiny_sd1

        model, dtype, shape = tiny_sd1(), torch.float32, (2, 4, 8, 8)
        model.text_encoders[0].to(dev)
    else:
        from .workload import WORKLOADS, engine_model

        model, dtype = engine_model(name, with_vae=False), torch.bfloat16
        side = WORKLOADS[name]["resolution"] // 8
        shape = (2, 4, side, side)
    model.unet.to(dev, dtype)
    net = build_network(model, TrainConfig(train_data_dir=".", output_dir=".", lora_rank=16, lora_alpha=8))
    net.to(dev)
    model.unet.requires_grad_(False)
    torch.manual_seed(0)
    for lora in net.loras.values():
        torch.nn.init.normal_(lora.lora_up.weight, std=1e-2)
    net.attach()
    x = torch.randn(shape, device=dev, dtype=dtype)
    t = torch.tensor([100, 700], device=dev)
    with torch.no_grad():
        cond = {k: v.to(dev) for k, v in _cond(model, name, dev).items()}
    params = [p for p in net.parameters() if p.requires_grad]

    def loss(x, t, cond):
        return model.predict(x, t, cond).float().pow(2).mean()

    def grads(fn):
        for p in params:
            p.grad = None
        fn(x, t, cond).backward()
        return [p.grad.float().flatten().clone() for p in params]

    with fp8_compute(model.unet, True, dev, "bf16") if fp8 else contextlib.nullcontext():
        eager = grads(loss)
        compiled = grads(torch.compile(loss, dynamic=False))
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(eager, compiled)]
    rel = [float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(eager, compiled)]
    net.detach()
    return {"model": name + ("-fp8" if fp8 else ""), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "tensors": len(cos),
            "worst_cosine": round(min(cos), 4), "median_cosine": round(statistics.median(cos), 4),
            "max_relative_difference": round(max(rel), 4)}


def _cond(model, name, dev):
    if name == "tiny":
        return model.encode_text(["a photo", "a drawing"])
    from .workload import random_cond

    context, pooled = random_cond(name, 2, device=dev)
    return {"context": context} if pooled is None else {"context": context, "pooled": pooled}


def main(argv: list[str]) -> None:
    for name in argv or ["tiny", "sd15"]:
        print(json.dumps(check(name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
