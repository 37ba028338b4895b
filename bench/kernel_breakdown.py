"""Where the GPU time of our training step goes: kernel time over the timed steps, by kind.

    python -m bench.kernel_breakdown [sd15|sdxl|flux1] [batch] [on|off] [key=value ...]

Runs the engine as `bench.ours` does (extra config keys after the row, e.g. `cuda_graph=false`, or
`fp8_compute=true` for the fp8 layers; `fp8_base=true` is done here as bench.ours' ours-fp8 does it),
profiles the steps after the warm-up with torch.profiler (the kernels of CUDA-graph replays included)
and sums kernel time by kind (matmul, convolution, attention, normalisation, optimizer, the rest:
elementwise, copies, reductions), with each kind's largest kernels, against the wall time of the
same steps. For deciding what to fuse, not a benchmark row.
"""

from __future__ import annotations

import collections
import re
import sys
import tempfile
from pathlib import Path

from .common import Config, reset_memory, row_args
from .ours import run_config
from .workload import engine_model

# first match wins: cuDNN's attention kernels (…_sdpa_…_flash_…) before its convolutions, and those
# (implicit-GEMM, layout transposes) before the matmuls
KINDS = (("attention", r"flash|fmha|attention|sdpa|mem_eff"),
         ("fp8 quantise", r"quantize_rows"),  # fp8_compute's Triton kernel (engine/models/fp8_quant.py)
         ("matmul fp8", r"e4m3|f8f8|float8|fp8|nvjet_qq"),  # fp8_compute's _scaled_mm (cuBLAS or CUTLASS)
         ("convolution", r"conv|fprop|dgrad|wgrad|winograd|implicit_gemm|cudnn"),
         ("matmul", r"gemm|cutlass|nvjet|cublas|xmma|splitk"),
         ("normalisation", r"norm"),
         ("optimizer", r"adam|multi_tensor|foreach"))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def main(argv=None) -> int:
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    model_name, batch, gc, extra = row_args(sys.argv[1:] if argv is None else argv, batch=8, gc=False)
    warmup, steps = 5, 10
    if model_name == "flux1":  # Flux.1-dev's layout with random weights, as bench.ours builds it
        from .workload_flux import engine_model as flux_model

        model = flux_model()
        denoiser = model.transformer
    else:
        model = engine_model(model_name)
        denoiser = model.unet
    if extra.pop("fp8_base", False):  # the config key is for a base_model the engine loads; this one is built here
        from engine.models.fp8 import store_in_fp8

        store_in_fp8(denoiser)
    cfg = Config("ours", model_name, batch, gc, steps=steps, warmup=warmup)
    reset_memory()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    wall = []

    def on_step(step):  # each step event follows a device sync
        if step == warmup:
            prof.__enter__()
            wall.append(time.perf_counter())
        elif step == warmup + steps:
            torch.cuda.synchronize()
            wall.append(time.perf_counter())
            prof.__exit__(None, None, None)

    run_config(model, cfg, Path(tempfile.mkdtemp(prefix="bench_kern_")), extra, on_step=on_step)
    by_kind: dict[str, float] = collections.Counter()
    top: dict[str, list] = collections.defaultdict(list)
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        kind = kind_of(e.key)
        by_kind[kind] += us
        top[kind].append((us, e.count, e.key))
    kernel_ms = sum(by_kind.values()) / 1e3 / steps
    wall_ms = (wall[1] - wall[0]) * 1e3 / steps
    print(f"{model_name} b{batch} gc={'on' if gc else 'off'} {extra}: {wall_ms:.1f} ms/step wall, "
          f"{kernel_ms:.1f} ms/step in kernels ({100 * kernel_ms / wall_ms:.0f}% of the wall time)")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:14} {us / 1e3 / steps:8.2f} ms/step  {100 * us / sum(by_kind.values()):5.1f}%")
        for t, n, name in sorted(top[kind], reverse=True)[:4]:
            print(f"      {t / 1e3 / steps:7.2f} ms  x{n // steps:<5} {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
