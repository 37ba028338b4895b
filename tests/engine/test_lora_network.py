"""LoRA hooks: they change the output, strength 0 is the base, and detaching leaves no trace."""

import copy

import pytest
import torch
from torch import nn

from engine.lora.network import LoRANetwork


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.proj(x).transpose(1, 2).reshape(x.shape[0], 16, 2, 2)
        return self.point(self.conv(h))


def _network(block, rank=4, alpha=2.0):
    net = LoRANetwork()
    for name in ("proj", "conv", "point"):
        net.add(f"lora_unet_{name}", getattr(block, name), rank, alpha)
    with torch.no_grad():
        for m in net.loras.values():
            m.lora_up.weight.normal_()
    return net


def test_hooks_change_output_and_detach_restores_exactly():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 4, 8)
    before_sd = copy.deepcopy(block.state_dict())
    base = block(x)
    net = _network(block)
    net.attach()
    with_lora = block(x)
    assert not torch.allclose(base, with_lora)
    net.set_multiplier(0.0)
    assert torch.equal(block(x), base)
    net.detach()
    net.set_multiplier(1.0)
    assert torch.equal(block(x), base)
    assert block.state_dict().keys() == before_sd.keys()
    assert all(torch.equal(block.state_dict()[k], v) for k, v in before_sd.items())
    assert not block.proj._forward_hooks and not block.conv._forward_hooks


def test_zero_init_is_identity_and_scale_is_alpha_over_rank():
    torch.manual_seed(0)
    lin = nn.Linear(3, 5)
    net = LoRANetwork()
    m = net.add("lora_unet_lin", lin, rank=2, alpha=1.0)
    x = torch.randn(4, 3)
    base = lin(x)
    with net.applied():
        assert torch.equal(lin(x), base)  # up is zero-initialised
        with torch.no_grad():
            m.lora_up.weight.fill_(1.0)
        expected = base + 0.5 * (x @ m.lora_down.weight.T @ m.lora_up.weight.T)
        assert torch.allclose(lin(x), expected, atol=1e-6)
    assert torch.equal(lin(x), base)


def test_kohya_state_dict_layout_and_shapes():
    block = Block()
    net = _network(block, rank=4, alpha=2.0)
    sd = net.kohya_state_dict()
    assert set(sd) == {f"lora_unet_{n}.{p}" for n in ("proj", "conv", "point")
                       for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd["lora_unet_proj.lora_down.weight"].shape == (4, 8)
    assert sd["lora_unet_conv.lora_down.weight"].shape == (4, 16, 3, 3)  # 3x3 down, 1x1 up, as kohya
    assert sd["lora_unet_conv.lora_up.weight"].shape == (16, 4, 1, 1)
    assert sd["lora_unet_point.lora_down.weight"].shape == (4, 16, 1, 1)
    assert sd["lora_unet_proj.alpha"].dim() == 0 and float(sd["lora_unet_proj.alpha"]) == 2.0
    assert all(t.dtype == torch.float16 for t in sd.values())


def test_gradients_reach_only_lora_parameters():
    block = Block().requires_grad_(False)
    net = _network(block)
    net.attach()
    block(torch.randn(2, 4, 8)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in block.parameters())


def test_load_rejects_wrong_rank_with_advice():
    block = Block()
    net = _network(block, rank=4)
    other = _network(Block(), rank=2).kohya_state_dict(None)
    with pytest.raises(ValueError, match="lora_rank"):
        net.load_kohya_state_dict(other)


def test_casting_the_weights_together_gives_the_per_weight_casts_values_and_gradients():
    from engine.lora.network import cast_together

    torch.manual_seed(0)
    weights = [torch.randn(16, 32, requires_grad=True), torch.randn(64, 16, requires_grad=True),
               torch.randn(16, 8, 3, 3, requires_grad=True), torch.randn(4, 16, 1, 1)]
    x = torch.randn(5, 32)

    def grads(cast):
        for w in weights:
            w.grad = None
        down, up, conv, frozen = cast(weights)
        y = (x.bfloat16() @ down.t()) @ up.t()
        (y.float().sum() + conv.float().square().sum() + frozen.float().sum()).backward()
        return [down, up, conv, frozen], [w.grad for w in weights]

    own, own_grads = grads(lambda ws: [w.to(torch.bfloat16) for w in ws])
    together, together_grads = grads(lambda ws: cast_together(ws, torch.bfloat16))
    for a, b in zip(own, together):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(own_grads[:3], together_grads[:3]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert together_grads[3] is None
