"""Flux's training forward keeps no more for backward than diffusers' (issue 16), with the same numbers.

Without gradient checkpointing every byte a block keeps per token costs 57 x 4608 bytes per image at
1024 px; the GPU showed ours keeping ~43 GiB of activations at batch 1 against diffusers' ~27 GiB.
engine/models/flux_lean.py cuts the float32 copies of the q/k RMSNorm and keeps recipes of cheap tensors
(GELU outputs, LayerNorm and modulation outputs) instead of the tensors.
"""

from __future__ import annotations

import pytest
import torch

from bench import flux_saved_bytes as fsb
from engine.models import flux_forward
from engine.models.flux_lean import lean_flux, lean_saves, recomputed, rms_norm


def _bfl_rms(x, scale):  # BFL's flux/modules/layers.py RMSNorm, as flux_forward computed it before
    rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return (x.float() * rrms).to(x.dtype) * scale.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_gives_bfls_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 5, 128, generator=g) * 3).to(dtype)
    scale = (torch.rand(128, generator=g) + 0.5).to(dtype)
    grad = torch.randn(2, 3, 5, 128, generator=g).to(dtype)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    s1, s2 = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    y1, y2 = rms_norm(ours, s1), _bfl_rms(ref, s2)
    assert torch.equal(y1, y2)  # the same ops in the same order: bit-identical forward
    y1.backward(grad)
    y2.backward(grad)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.grad, ref.grad, **tol)
    torch.testing.assert_close(s1.grad, s2.grad, **tol)


def _loss_and_grads(checkpoint: bool, lean: bool):
    torch.manual_seed(0)
    transformer, network, _ = fsb.ours(256)
    x, sigma, context, pooled, guidance = fsb.inputs(8, 8, 256)
    with lean_flux(lean), network.applied(), network.cast_weights(torch.bfloat16):  # off: every tensor kept
        out = flux_forward.flux_forward(transformer, x.to(torch.bfloat16), sigma, context, pooled, guidance,
                                        checkpoint=checkpoint)
        loss = out.float().pow(2).mean()
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in network.named_parameters() if p.grad is not None}


def test_lean_saves_change_no_loss_and_no_lora_gradient():
    """Recipes recompute with the same ops on the same tensors: the loss and every LoRA gradient are
    bit-identical to the plain forward's and to a checkpointed one's (which recomputes whole blocks)."""
    lean_loss, lean = _loss_and_grads(checkpoint=False, lean=True)
    for checkpoint, lean_flag in ((False, False), (True, True)):
        loss, grads = _loss_and_grads(checkpoint=checkpoint, lean=lean_flag)
        assert torch.equal(loss, lean_loss)
        assert grads.keys() == lean.keys() and len(grads) > 0
        for key in grads:
            assert torch.equal(grads[key], lean[key]), key
    assert any(g.abs().sum() > 0 for g in lean.values())


def test_our_blocks_keep_no_more_per_token_than_diffusers_blocks():
    """Bytes kept for backward per token by one double and one single block (checkpointing off), ours
    with a LoRA on every Linear of both block kinds (kohya's default) against diffusers'
    FluxTransformer2DModel with PEFT on the 342 default modules of train_dreambooth_lora_flux.py (fewer
    layers: no LoRA on the single blocks' proj_mlp/proj_out nor on any modulation). Before the lean
    forward ours kept 60.6 and 54.4 bytes per token per unit of width against diffusers' 48.9 and
    32.5 (width 256, `python -m bench.flux_saved_bytes`)."""
    width = 128
    module, _, run = fsb.ours(width)
    ours, _ = fsb.saved_per_token(module, run, width, sides=(4, 8), text=4)
    with lean_flux(False):  # what autograd keeps of the same forward without recipes
        keep_all, _ = fsb.saved_per_token(module, run, width, sides=(4, 8), text=4)
    module, run = fsb.diffusers(width)
    theirs, _ = fsb.saved_per_token(module, run, width, sides=(4, 8), text=4)
    for kind in ("double", "single"):
        assert 0 < ours[kind] <= theirs[kind], (kind, ours, theirs)
        assert ours[kind] < keep_all[kind], (kind, ours, keep_all)



def test_recipes_remake_their_tensors_under_the_autocast_they_were_made_in():
    """Backward runs outside the forward's autocast; a recipe enters it again, or a tensor made in
    another dtype comes back (fp8_base and `autocast: always` runs train Flux under autocast; on the
    CPU a Linear is what autocast changes)."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(4, 8, generator=g), torch.randn(8, 8, generator=g)

    def make(a):
        return torch.nn.functional.linear(a, w)

    def grad(lean):
        s = torch.ones(8, requires_grad=True)
        with lean_saves(lean), torch.autocast("cpu", dtype=torch.bfloat16):
            h = recomputed(make(a), make, a)
            assert h.dtype == torch.bfloat16
            loss = (h * s).float().pow(2).sum()  # the product keeps h for s's gradient
        loss.backward()  # outside autocast, as the step runs it
        return s.grad

    assert torch.equal(grad(True), grad(False))
