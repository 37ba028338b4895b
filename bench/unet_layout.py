"""The bare UNet's forward and backward speed by memory layout, eager or compiled: the ceiling our
training step is measured against, and the check behind leaving channels-last out of the engine.

    python -m bench.unet_layout [sd15|sdxl] [batch] [nchw,cl,nchwc,clc]

`nchw`/`cl`: contiguous or channels-last weights and input; a trailing `c` compiles the step with
torch.compile. Each mode runs the frozen bf16 UNet forward and backward to its input (every layer's
input gradient, no weight gradients, no LoRA, no optimizer), 5 warm-up and 20 timed steps, and
prints images/s (median step) and peak memory. For deciding, not a benchmark row.
"""

from __future__ import annotations

import sys
import time


def main(argv=None) -> int:
    import torch

    from .workload import build_unet, random_cond, random_latents

    argv = sys.argv[1:] if argv is None else argv
    model = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else 8
    modes = argv[2].split(",") if len(argv) > 2 else ["nchw", "cl"]
    torch.backends.cudnn.benchmark = True
    unet = build_unet(model)
    ctx, pooled = random_cond(model, batch)
    ctx, lat = ctx.bfloat16(), random_latents(model, batch).bfloat16()
    t = torch.full((batch,), 500, device=lat.device, dtype=torch.long)
    added = None
    if pooled is not None:
        size = lat.shape[-1] * 8
        added = {"text_embeds": pooled.bfloat16(),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=lat.device,
                                          dtype=torch.bfloat16)}

    def step(x):
        x = x.detach().requires_grad_(True)
        unet(x, t, ctx, added_cond_kwargs=added).sample.float().square().mean().backward()

    for mode in modes:
        layout = torch.channels_last if mode.startswith("cl") else torch.contiguous_format
        unet.to(memory_format=layout)
        x = lat.contiguous(memory_format=layout)
        fn = torch.compile(step) if mode.endswith("c") else step
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{model} b{batch} {mode}: {batch / times[10]:.2f} img/s, peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
