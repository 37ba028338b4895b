"""One frozen Linear's forward + input gradient in bf16 and through fp8_compute, at SDXL batch 8 shapes.

    python -m bench.fp8_gemms [--model flux1] [--out results.json]

For each of SDXL's big Linear shapes at 1024 px, batch 8, it times (CUDA events, mean of 50 calls
after warm-up) the bf16 pair a frozen layer runs (F.linear forward, dy @ W backward) against
engine/models/fp8_compute.py's path through autograd, and each fp8 piece apart: quantising x, the
forward GEMM, quantising dy (with the weight's row scales folded in), transposing the fp8 weight,
the backward GEMM. Variants show what each design choice costs or buys: a kept transposed copy
instead of the per-step transpose (`KEEP_TRANSPOSED`), fast accumulation on/off, per-tensor scales
instead of row-wise, and the torch-ops quantisation instead of the Triton kernel. The last column
is bf16 time / fp8 time for the whole forward + input gradient.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .lora_gemms import timed

B = 8
# (name, token rows M, in K, out N) for SDXL at 1024 px, batch 8 (32x32 tokens at the 1280 level, 64x64 at 640)
LAYERS = [("attn q/k/v/out 1280", B * 1024, 1280, 1280), ("ff.net.0.proj 1280", B * 1024, 1280, 10240),
          ("ff.net.2 1280", B * 1024, 5120, 1280), ("attn2 k/v (text) 1280", B * 77, 2048, 1280),
          ("attn q/k/v/out 640", B * 4096, 640, 640), ("ff.net.0.proj 640", B * 4096, 640, 5120),
          ("ff.net.2 640", B * 4096, 2560, 640), ("proj_in/out 1280", B * 1024, 1280, 1280)]
# Flux.1 at 1024 px, batch 1: double blocks run image (4096) and text (512) tokens through their own
# layers, single blocks all 4608 together
FLUX_LAYERS = [("img_attn.qkv", 4096, 3072, 9216), ("img_attn.proj", 4096, 3072, 3072),
               ("img_mlp.0", 4096, 3072, 12288), ("img_mlp.2", 4096, 12288, 3072),
               ("txt_mlp.0", 512, 3072, 12288), ("linear1", 4608, 3072, 21504), ("linear2", 4608, 15360, 3072)]


def measure(m: int, k: int, n: int) -> dict:
    import engine.models.fp8_compute as fc
    from engine.models.fp8_quant import quantize_rows, quantize_rows_torch

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    lin = torch.nn.Linear(k, n, device=dev, dtype=bf).requires_grad_(False)
    x = torch.randn(m, k, device=dev, dtype=bf, generator=g).requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=bf, generator=g)
    w = fc.fp8_weight(lin)
    w_kept = fc.fp8_weight(lin, keep_transposed=True)
    xq, xs = quantize_rows(x.detach())
    gq, gs = quantize_rows(dy, w.fold)
    q_t = w.q.t().contiguous()
    one = torch.ones((), device=dev)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x), x, dy)

    def fp8_with(fwd_accum, bwd_accum):
        def run():
            fc.FAST_ACCUM_FORWARD, fc.FAST_ACCUM_BACKWARD = fwd_accum, bwd_accum
            return torch.autograd.grad(fc.linear_fp8(x, w), x, dy)
        return run

    cases = {
        "bf16 forward": lambda: F.linear(x.detach(), lin.weight, lin.bias),
        "bf16 input grad": lambda: dy.mm(lin.weight),
        "bf16 forward+input grad": fwd_bwd(lambda t: F.linear(t, lin.weight, lin.bias)),
        "fp8 quantise x (Triton)": lambda: quantize_rows(x.detach()),
        "fp8 quantise x (torch ops)": lambda: quantize_rows_torch(x.detach()),
        "fp8 forward GEMM (row-wise, fast accum)": lambda: torch._scaled_mm(
            xq, w.q.t(), scale_a=xs, scale_b=w.scale, bias=w.bias, out_dtype=bf, use_fast_accum=True),
        "fp8 forward GEMM (per-tensor scales)": lambda: torch._scaled_mm(
            xq, w.q.t(), scale_a=one, scale_b=one, bias=w.bias, out_dtype=bf, use_fast_accum=True),
        "fp8 quantise dy with row scales (Triton)": lambda: quantize_rows(dy, w.fold),
        "fp8 transpose weight (per step)": lambda: w.q.t().contiguous(),
        "fp8 input-grad GEMM (row-wise, exact accum)": lambda: torch._scaled_mm(
            gq, q_t.t(), scale_a=gs, scale_b=w.scale_in, out_dtype=bf, use_fast_accum=False),
        "fp8 input-grad GEMM (row-wise, fast accum)": lambda: torch._scaled_mm(
            gq, q_t.t(), scale_a=gs, scale_b=w.scale_in, out_dtype=bf, use_fast_accum=True),
        "fp8 forward+input grad (engine default)": fp8_with(True, False),
        "fp8 forward+input grad, fast accum both": fp8_with(True, True),
        "fp8 forward+input grad, transposed copy kept": lambda: torch.autograd.grad(fc.linear_fp8(x, w_kept), x, dy),
    }
    accum = fc.FAST_ACCUM_FORWARD, fc.FAST_ACCUM_BACKWARD
    try:
        out = {label: timed(fn) * 1000 for label, fn in cases.items()}  # microseconds
    finally:
        fc.FAST_ACCUM_FORWARD, fc.FAST_ACCUM_BACKWARD = accum
    fp8 = out["fp8 forward+input grad (engine default)"]
    out["speedup (bf16 / fp8 default)"] = out["bf16 forward+input grad"] / fp8
    out["transposed copy memory MiB"] = k * n / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the numbers as JSON here")
    ap.add_argument("--model", choices=("sdxl", "flux1"), default="sdxl", help="whose layer shapes (flux1: batch 1)")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__)
    results = {}
    total_bf16 = total_fp8 = 0.0
    for name, m, k, n in (FLUX_LAYERS if args.model == "flux1" else LAYERS):
        r = measure(m, k, n)
        results[name] = dict(M=m, K=k, N=n, **r)
        tflop = 2 * 2 * m * k * n / 1e12  # forward and input gradient
        total_bf16 += r["bf16 forward+input grad"]
        total_fp8 += r["fp8 forward+input grad (engine default)"]
        print(f"\n{name}: M={m}, K={k}, N={n} ({tflop * 1e3:.0f} GFLOP forward + input grad)")
        for label, v in r.items():
            unit = "x" if label.startswith("speedup") else (" MiB" if "MiB" in label else " us")
            extra = f"  {tflop / (v * 1e-6):6.0f} TFLOP/s" if label.endswith(("input grad", "(engine default)")) else ""
            print(f"  {label:48s} {v:9.1f}{unit}{extra}")
    print(f"\nall shapes, one layer each: bf16 {total_bf16:.0f} us, fp8 {total_fp8:.0f} us "
          f"({total_bf16 / total_fp8:.2f}x)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
