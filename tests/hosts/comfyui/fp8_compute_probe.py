"""Run with the ComfyUI venv's python: fp8_compute on ComfyUI 0.3.75's own Linear classes holding fp8
weights (comfy.ops.manual_cast, what Load Diffusion Model with weight_dtype fp8_e4m3fn builds, and the
scaled-fp8 ops with their `scale_weight`), on the CPU through torch's CPU `_scaled_mm`. Prints JSON
per layer: whether it was taken over, whether the fp8 weight was used as stored (same storage), the
output's and input gradient's relative error against ComfyUI's own forward, and whether the layer's
tensors and attributes are bit-identical afterwards.

    $COMFYUI_PYTHON tests/hosts/comfyui/fp8_compute_probe.py
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from keys_probe import load_pack  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402


def raw(t):
    return t.detach().reshape(-1).view(torch.uint8)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fp8_layers():
    import comfy.ops

    torch.manual_seed(0)
    out = {}
    plain = comfy.ops.manual_cast.Linear(64, 48, dtype=torch.float8_e4m3fn)
    scaled = comfy.ops.scaled_fp8_ops(override_dtype=torch.float8_e4m3fn).Linear(64, 48)
    patched = comfy.ops.manual_cast.Linear(64, 48, dtype=torch.float8_e4m3fn)
    for layer, scale in ((plain, None), (scaled, 0.01), (patched, None)):
        w = torch.randn(48, 64) * 0.1
        layer.weight = torch.nn.Parameter((w / scale if scale else w).to(torch.float8_e4m3fn), requires_grad=False)
        layer.bias = torch.nn.Parameter(torch.randn(48).to(torch.float8_e4m3fn), requires_grad=False)
        if scale:
            layer.scale_weight = torch.nn.Parameter(torch.tensor(scale), requires_grad=False)
    patched.weight_function = [lambda weight: weight * 2]  # ComfyUI's per-call patch (LoRA in lowvram mode)
    out.update(plain=plain, scaled=scaled, patched=patched)
    return out


def run(layer, x):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad


def main():
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args

    args.cpu = True
    load_pack()
    import inplace_pack.engine.models.fp8_compute as fc

    fc.ALLOW_CPU = True
    made = []
    original = fc.fp8_weight
    fc.fp8_weight = lambda layer, keep=False: made.append((layer, original(layer, keep))) or made[-1][1]
    x = torch.randn(3, 40, 64, dtype=torch.bfloat16)
    result = {}
    for name, layer in fp8_layers().items():
        before = {k: v.detach().clone() for k, v in layer.state_dict(keep_vars=True).items()}
        attrs = dict(layer.__dict__)
        ref_y, ref_dx = run(layer, x)
        made.clear()
        with fc.fp8_compute(layer, True, "cpu", "bf16", min_rows=16) as n:
            y, dx = run(layer, x)
        now = layer.state_dict(keep_vars=True)
        result[name] = {
            "taken_over": n, "stored_weight_used": bool(made) and all(
                w.q.data_ptr() == lay.weight.data_ptr() and not w.copied for lay, w in made),
            "output_rel": rel(y, ref_y), "input_grad_rel": rel(dx, ref_dx), "output_equal": bool(torch.equal(y, ref_y)),
            "bit_identical": all(torch.equal(raw(now[k]), raw(v)) for k, v in before.items()),
            "attributes_restored": layer.__dict__.keys() == attrs.keys() and "forward" not in layer.__dict__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
