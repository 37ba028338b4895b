"""The up projection added into the base output in place: the same numbers as the copying addmm, no
view copies in backward, and never into a tensor another hook has seen."""

import pytest
import torch
from torch import nn

from engine.lora.network import LoRANetwork


def _layer(bias: bool, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(12, 20, bias=bias).to(dtype).requires_grad_(False)
    net = LoRANetwork()
    lora = net.add("lora_unet_lin", lin, rank=4, alpha=2.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    return lin, net, lora


def _copying(lin, lora, x):
    """The reference: base output plus the copying addmm, as the hook computed it before."""
    out = lin(x)
    h = torch.nn.functional.linear(x, lora.lora_down.weight.to(out.dtype))
    n, r = out.shape[-1], h.shape[-1]
    up = lora.lora_up.weight.to(out.dtype)
    return torch.addmm(out.reshape(-1, n), h.reshape(-1, r), up.t(), alpha=lora._scale).view(out.shape)


def _grads(fn, x, lora):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    names = _graph_names(out.grad_fn)
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = [x.grad, lora.lora_down.weight.grad, lora.lora_up.weight.grad]
    lora.zero_grad(set_to_none=True)
    return out.detach(), grads, names


def _graph_names(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return set()
    seen.add(fn)
    names = {type(fn).__name__}
    for nxt, _ in fn.next_functions:
        names |= _graph_names(nxt, seen)
    return names


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 12), (2, 3, 12)])
def test_in_place_matches_the_copying_addmm_bit_for_bit(bias, dtype, shape):
    lin, net, lora = _layer(bias, dtype)
    x = torch.randn(*shape, dtype=dtype)
    want, want_grads, _ = _grads(lambda t: _copying(lin, lora, t), x, lora)
    with net.applied():
        got, got_grads, names = _grads(lin, x, lora)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    # written in place, and without autograd copying the gradient for an in-place op on a view
    assert "AddUpInPlaceBackward" in names and "CopySlices" not in names


def test_no_grad_call_is_in_place_and_equal():
    lin, net, lora = _layer(True, torch.float32)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        want = _copying(lin, lora, x)
        with net.applied():
            assert torch.equal(lin(x), want)


def test_another_hook_keeps_the_output_it_saw():
    """A hook registered before ours may keep the base output: then ours adds into a copy."""
    lin, net, lora = _layer(True, torch.float32)
    seen = []
    lin.register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.randn(2, 3, 12, requires_grad=True)
    base = lin(x).detach().clone()
    seen.clear()
    with net.applied():
        out = lin(x)
    assert torch.equal(seen[0], base)
    assert not torch.equal(out, base)
    assert "AddUpInPlaceBackward" not in _graph_names(out.grad_fn)
