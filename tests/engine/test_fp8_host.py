"""A host's fp8 Linear (ComfyUI's casting Linear over fp8_e4m3fn weights, as a Flux loaded in fp8 runs)
keeps its fp8 weight for backward instead of a bf16 copy, computes what the host computes, and is
given back bit-identical; fp8_compute still takes such a layer over."""

import pytest
import torch
from torch import nn

import engine.models.fp8_compute as fc
from engine.models.fp8_host import host_fp8_casts

from test_fp8_compute import comfy_fp8_linear, same_bits, snapshot

BF16 = torch.bfloat16


def _step(model, x):
    """Output, input gradient and the tensors autograd saved, for one forward and backward."""
    saved = []
    x = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, saved


def _bf16_copies(saved, layers):
    weights = [lin.weight.to(BF16) for lin in layers]
    return [t for t in saved for w in weights if t.dtype == BF16 and t.numel() == w.numel()]


@pytest.mark.parametrize("scale", [None, 0.01])
def test_host_fp8_linear_keeps_no_bf16_copy_and_comes_back_bit_identical(scale):
    torch.manual_seed(0)
    model = nn.Sequential(comfy_fp8_linear(scale), nn.GELU(), _second(scale))
    before = snapshot(model)
    x = torch.randn(3, 40, 64, dtype=BF16)
    host_out, host_dx, host_saved = _step(model, x)
    layers = [model[0], model[2]]
    assert len(_bf16_copies(host_saved, layers)) >= 2  # what ComfyUI's cast keeps, one per layer
    with host_fp8_casts(model) as n:
        assert n == 2
        out, dx, saved = _step(model, x)
    assert not _bf16_copies(saved, layers)
    assert torch.equal(out, host_out) and torch.equal(dx, host_dx)
    assert same_bits(model, before) and all("forward" not in m.__dict__ for m in model.modules())


def _second(scale):
    lin = comfy_fp8_linear(scale)
    out = type(lin)(48, 32)
    out.weight = nn.Parameter(lin.weight[:32, :48].contiguous(), requires_grad=False)
    out.bias = nn.Parameter(lin.bias[:32].contiguous(), requires_grad=False)
    if scale is not None:
        out.scale_weight = lin.scale_weight
    return out


def test_patched_offloaded_or_bf16_layers_stay_the_hosts():
    patched, bf16 = comfy_fp8_linear(None), comfy_fp8_linear(None)
    patched.weight_function = [lambda w: w * 2]  # ComfyUI's lowvram LoRA patch
    bf16.weight = nn.Parameter(bf16.weight.to(BF16), requires_grad=False)  # no copy to spare
    with host_fp8_casts(nn.ModuleList([patched, bf16])) as n:
        assert n == 0
    late = comfy_fp8_linear(None)
    x = torch.randn(40, 64, dtype=BF16)
    with host_fp8_casts(late) as n:
        assert n == 1
        late.weight_function = [lambda w: w * 2]  # a patch added during the run: the host's forward runs
        assert torch.equal(late(x), late.forward_comfy_cast_weights(x))


def test_fp8_compute_takes_over_a_layer_that_casts_itself(monkeypatch):
    monkeypatch.setattr(fc, "ALLOW_CPU", True)
    monkeypatch.setattr(fc, "MIN_ROWS", 16)
    lin = comfy_fp8_linear(None)
    before = snapshot(lin)
    with host_fp8_casts(lin), fc.fp8_compute(lin, True, "cpu", "bf16") as n:
        assert n == 1
        x = torch.randn(40, 64, dtype=BF16, requires_grad=True)
        lin(x).float().sum().backward()
        assert x.grad is not None
    assert same_bits(lin, before) and "forward" not in lin.__dict__
