"""On the GPU: does fp8_compute compute what the CPU tests check, on the real kernels?

    python -m bench.fp8_check [--out check.json]

1. The Triton quantisation kernel gives the torch ops' bits (fp8 values and scales), with and
   without the folded column scales, at SDXL shapes.
2. At SDXL batch 8 shapes, the forward and the input gradient are within fp8's tolerance of bf16
   (relative Frobenius error < 6%) and within 1% of a float32 product of the same quantised operands.
3. Captured in a CUDA graph and replayed on new data, the layer gives the eager result bit for bit.
4. Compiled by torch.compile (inductor), it gives the eager result within 1%.
5. On the full-size SDXL UNet: how many layers are taken over, the GiB of fp8 copies, none with
   fp8_base (the stored weights are used: same storage), and the UNet bit-identical afterwards.
Prints one line per check and `FP8_CHECK {json}`; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from .fp8_gemms import LAYERS


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_quantise() -> dict:
    from engine.models.fp8_quant import _triton_kernel, quantize_rows, quantize_rows_torch

    assert _triton_kernel(), "the Triton kernel could not be built"
    out = {}
    for name, m, k, n in LAYERS[:4]:
        g = torch.Generator("cuda").manual_seed(1)
        spread = torch.logspace(-3, 3, m, device="cuda")[:, None]  # rows of very different sizes
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g) * spread
        x[0] = 0
        fold = torch.rand(k, device="cuda", generator=g) + 0.5
        for label, col in (("plain", None), ("folded", fold)):
            q, s = quantize_rows(x, col)
            q_ref, s_ref = quantize_rows_torch(x, col)
            diff = float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean())
            out[f"{name} {label}"] = dict(mismatch_fraction=diff, scales_equal=bool(torch.equal(s, s_ref)))
    return out


def check_layers() -> dict:
    import engine.models.fp8_compute as fc
    from engine.models.fp8_quant import dequantize_rows, quantize_rows_torch

    out = {}
    for name, m, k, n in LAYERS:
        g = torch.Generator("cuda").manual_seed(2)
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = F.linear(x, lin.weight, lin.bias)
        (ref_dx,) = torch.autograd.grad(ref, x, dy)
        w = fc.fp8_weight(lin)
        got = fc.linear_fp8(x, w)
        (dx,) = torch.autograd.grad(got, x, dy)
        xq, xs = quantize_rows_torch(x.detach())
        exact = dequantize_rows(xq, xs) @ dequantize_rows(w.q, w.scale.t()).t() + lin.bias.float()
        gq, gs = quantize_rows_torch(dy, w.fold)
        exact_dx = dequantize_rows(gq, gs) @ w.q.float()
        r = dict(forward_vs_bf16=rel(got, ref), input_grad_vs_bf16=rel(dx, ref_dx),
                 forward_vs_exact=rel(got, exact), input_grad_vs_exact=rel(dx, exact_dx))
        r["ok"] = r["forward_vs_bf16"] < 0.06 and r["input_grad_vs_bf16"] < 0.06 and \
            r["forward_vs_exact"] < 0.01 and r["input_grad_vs_exact"] < 0.01
        out[name] = r
    return out


def _layer_step(fc, w, x, dy):
    out = fc.linear_fp8(x, w)
    return out, torch.autograd.grad(out, x, dy)[0]


def check_graph_and_compile() -> dict:
    import engine.models.fp8_compute as fc

    name, m, k, n = LAYERS[1]
    g = torch.Generator("cuda").manual_seed(3)
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    w = fc.fp8_weight(lin)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _layer_step(fc, w, x, dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_dx = _layer_step(fc, w, x, dy)
    with torch.no_grad():
        x.copy_(torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g))
        dy.copy_(torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g))
    graph.replay()
    eager_out, eager_dx = _layer_step(fc, w, x, dy)
    r = {"graph_replay_equals_eager": bool(torch.equal(static_out, eager_out) and torch.equal(static_dx, eager_dx))}
    compiled = torch.compile(lambda t: fc.linear_fp8(t, w), dynamic=False)
    c_out = compiled(x)
    (c_dx,) = torch.autograd.grad(c_out, x, dy)
    r.update(compiled_forward_vs_eager=rel(c_out, eager_out), compiled_input_grad_vs_eager=rel(c_dx, eager_dx))
    r["ok"] = r["graph_replay_equals_eager"] and r["compiled_forward_vs_eager"] < 0.01 and \
        r["compiled_input_grad_vs_eager"] < 0.01
    return r


def check_unet() -> dict:
    import engine.models.fp8_compute as fc
    from engine.models.fp8 import store_in_fp8

    from .workload import build_unet

    unet = build_unet("sdxl")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    messages: list[str] = []
    with fc.fp8_compute(unet, True, "cuda", "bf16", say=messages.append) as n_bf16:
        pass
    same = all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    store_in_fp8(unet)
    made = []
    original = fc.fp8_weight
    fc.fp8_weight = lambda layer, keep=False: made.append((layer, original(layer, keep))) or made[-1][1]
    try:
        with fc.fp8_compute(unet, True, "cuda", "bf16", say=messages.append) as n_fp8:
            pass
    finally:
        fc.fp8_weight = original
    shared = all(w.q.data_ptr() == layer.weight.data_ptr() and not w.copied for layer, w in made)
    r = dict(layers_bf16=n_bf16, layers_fp8_base=n_fp8, messages=messages, bit_identical_after=same,
             fp8_base_weights_shared=shared)
    r["ok"] = same and shared and n_bf16 > 500 and n_fp8 == n_bf16
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results, ok = {}, True
    checks = (("quantise", check_quantise), ("layers", check_layers), ("graph_and_compile", check_graph_and_compile),
              ("sdxl_unet", check_unet))
    for label, fn in checks:
        try:
            results[label] = fn()
        except Exception as exc:  # noqa: BLE001 - a failed check is a result
            results[label] = {"error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        r = results[label]
        if label == "quantise":
            good = "error" not in r and all(v["mismatch_fraction"] == 0 and v["scales_equal"] for v in r.values())
        elif label == "layers":
            good = "error" not in r and all(v["ok"] for v in r.values())
        else:
            good = r.get("ok", False)
        ok &= good
        print(f"{label}: {'OK' if good else 'FAILED'} {json.dumps(r)}", flush=True)
    print("FP8_CHECK " + json.dumps(results), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
