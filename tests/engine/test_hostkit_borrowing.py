"""Borrowing a host's modules for training gives them back exactly: the guarantees behind "the
ComfyUI model is left bit-identical", checked on modules built under inference mode as ComfyUI's are."""
import contextlib
import weakref

import pytest
import torch
from torch import nn

from engine.hostkit.borrowing import borrowed_weights, clip_backprop_guard, state_fingerprint
from engine.models.module_state import checkpointed_forwards, recompute_units


def inference_model(seed=0):
    torch.manual_seed(seed)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        model.register_buffer("scale", torch.full((8,), 0.5))
    return model


def values(model):
    with torch.inference_mode():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_hook(layer, rank=2):
    down = nn.Parameter(torch.randn(rank, layer.in_features) * 0.1)
    up = nn.Parameter(torch.randn(layer.out_features, rank) * 0.1)
    handle = layer.register_forward_hook(lambda m, a, out: out + a[0] @ down.T @ up.T)
    return (down, up), handle


def test_backprop_through_inference_weights_works_only_while_borrowed():
    model = inference_model()
    (down, up), handle = lora_hook(model[0])
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        model(x).pow(2).mean().backward()
    with borrowed_weights([model], [model]):
        model(x).pow(2).mean().backward()
        assert all(not p.requires_grad and not p.is_inference() for p in model.parameters())
    handle.remove()
    assert down.grad is not None and up.grad.abs().sum() > 0


@pytest.mark.parametrize("fail", [False, True])
def test_weights_and_flags_come_back_bit_identical(fail):
    model = inference_model()
    before, flags = values(model), state_fingerprint([model])
    ids = {k: id(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError) if fail else contextlib.nullcontext():
        with borrowed_weights([model], [model]):
            assert all(id(p) != ids[k] for k, p in model.named_parameters())
            if fail:
                raise ValueError("training failed")
    after = values(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert state_fingerprint([model]) == flags  # requires_grad True, inference tensors, same dtype/device


def test_swapped_weights_free_the_originals_one_at_a_time():
    model = inference_model()
    refs = [weakref.ref(p) for p in model.parameters()]
    with borrowed_weights([model], [model]):
        assert all(r() is None for r in refs), "an original weight is still alive: memory would double"


def test_frozen_but_not_swapped_roots_get_their_flags_back():
    trained, frozen = inference_model(0), inference_model(1)
    flags = state_fingerprint([frozen])
    with borrowed_weights([trained, frozen], [trained]):
        assert all(p.is_inference() and not p.requires_grad for p in frozen.parameters())
    assert state_fingerprint([frozen]) == flags


class InPlaceLayer(nn.Module):
    """The shape of ComfyUI's CLIPLayer: residual adds in place after LayerNorms."""

    def __init__(self):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.self_attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x += self.self_attn(self.layer_norm1(x))
        x += self.mlp(self.layer_norm2(x))
        return x


def test_clip_guard_makes_in_place_layers_trainable_and_leaves_no_hooks():
    layer = InPlaceLayer().requires_grad_(False)
    (down, up), handle = lora_hook(layer.self_attn)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="inplace"):
        layer(x.clone()).sum().backward()
    with clip_backprop_guard([layer]) as n:
        assert n == 2
        layer(x.clone()).sum().backward()
    handle.remove()
    assert up.grad is not None and state_fingerprint([layer])["hooks"] == 0


def test_checkpointed_forwards_give_the_same_gradients_and_restore_forward():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).requires_grad_(False)
    (down, up), handle = lora_hook(model[0])
    x = torch.randn(3, 8)
    model(x).sum().backward()
    plain = up.grad.clone()
    up.grad = down.grad = None
    with checkpointed_forwards(list(model.children())) as n:
        assert n == 3
        model(x).sum().backward()
    handle.remove()
    assert torch.allclose(up.grad, plain)
    assert state_fingerprint([model])["forwards"] == 0


class PatchedBlock(nn.Module):
    """Like ComfyUI's blocks: the options dict its UNet passes (and keeps changing between blocks)
    selects an attention patch by block."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, transformer_options):
        scale = transformer_options["patches"][transformer_options["block"]]
        return torch.tanh(self.lin(x) * scale)


@pytest.mark.parametrize("copy", [True, False])
def test_the_recompute_sees_the_options_the_forward_saw_only_when_they_are_copied(copy):
    torch.manual_seed(0)
    block = PatchedBlock().requires_grad_(False)
    (down, up), handle = lora_hook(block.lin)
    x = torch.randn(3, 8)
    grads = []
    for ctx in (contextlib.nullcontext(), checkpointed_forwards([block], copy_dict_args=copy)):
        options = {"patches": {"input": 2.0, "output": -3.0}, "block": "input"}
        down.grad = up.grad = None
        with ctx:
            out = block(x, options)
            options["block"] = "output"  # the UNet moves on before backward recomputes this block
            out.square().sum().backward()
        grads.append((down.grad.clone(), up.grad.clone()))
    handle.remove()
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert same == copy  # without the copy the recompute applies the other block's patch


class Transformer(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.transformer_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))


def test_a_transformer_of_several_blocks_is_checkpointed_block_by_block():
    res, one, two = nn.Linear(4, 4), Transformer(1), Transformer(2)
    units = recompute_units([res, one, two])
    assert [id(u) for u in units] == [id(res), id(one), *map(id, two.transformer_blocks)]
