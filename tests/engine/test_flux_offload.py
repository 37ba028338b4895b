"""cpu_offload_checkpointing: checkpointed Flux blocks keep their inputs in host memory, the gradients
unchanged; and the Linears of a Flux block sum their input gradients in place (flux_forward._linear)."""

from __future__ import annotations

import gc
import weakref

import torch

from bench import flux_saved_bytes as fsb
from engine.config import load_config
from engine.models import flux_forward
from engine.models.flux_offload import offload_checkpointing, offloaded_checkpoint
from engine.train import train

from test_flux_cli import _config, data, flux_files  # noqa: F401  (fixtures)
from test_flux_lean import _loss_and_grads as lean_loss_and_grads


def _loss_and_grads(offload: bool):
    """Loss and LoRA gradients of a checkpointed step of a one-double, one-single-block Flux."""
    with offload_checkpointing(offload):
        return lean_loss_and_grads(checkpoint=True, lean=True)


def test_offloaded_checkpointing_gives_bit_identical_loss_and_lora_gradients():
    plain_loss, plain = _loss_and_grads(offload=False)
    loss, grads = _loss_and_grads(offload=True)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys() and len(grads) > 0
    for key in grads:
        assert torch.equal(grads[key], plain[key]), key
    assert any(g.abs().sum() > 0 for g in grads.values())


def _chain(offload: bool):
    """Three checkpointed 'blocks'; returns (loss, weak reference to the second block's input, inputs the
    recomputations saw, the weight)."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    seen = []

    def block(h, scale):
        seen.append((h.detach().clone(), h.requires_grad))  # not h: that would keep it alive
        return torch.tanh(h @ w) * scale

    h = torch.randn(4, 8) @ w  # requires grad, as a block output does
    scale = torch.tensor(1.5)
    ref = None
    for i in range(3):
        if i == 1:
            ref = weakref.ref(h)
        if offload:
            h = offloaded_checkpoint(block, 1, h, scale)
        else:
            h = torch.utils.checkpoint.checkpoint(block, h, scale, use_reentrant=False)
    return h.sum(), ref, seen, w


def test_block_inputs_leave_the_device_after_the_forward_and_come_back_for_backward():
    for offload in (False, True):
        loss, ref, seen, w = _chain(offload)
        gc.collect()
        assert (ref() is None) == offload  # plain checkpointing keeps each block's input until backward
        forward_inputs = list(seen)
        loss.backward()
        assert len(seen) == 6  # each block ran again in backward
        for (again, needs_grad), (first, _) in zip(reversed(seen[3:]), forward_inputs):
            assert torch.equal(again, first) and needs_grad  # the forward's values, requiring grad as they did
        grad = w.grad.clone()
        if not offload:
            plain_grad = grad
    assert torch.equal(grad, plain_grad)


def test_backward_brings_back_the_previous_blocks_inputs_ahead_of_its_recomputation(monkeypatch):
    """Backward recomputes the blocks last to first; while one is recomputed, the inputs of the one before
    it are copied back (prefetched), so every block but the first backward reaches restores from a copy
    already on its way. The gradients stay bit-identical, over two steps in a row."""
    from engine.models import flux_offload

    restores = []
    real = flux_offload._Held.restore
    monkeypatch.setattr(flux_offload._Held, "restore", lambda self: restores.append(self) or real(self))
    for step in range(2):
        restores.clear()
        loss, _, seen, w = _chain(offload=True)
        loss.backward()
        assert [h.prefetched for h in restores] == [False, True, True], step  # last block first
        assert all(h.ready is None for h in restores)  # nothing left on the device after use
        loss_plain, _, _, w_plain = _chain(offload=False)
        loss_plain.backward()
        assert torch.equal(w.grad, w_plain.grad)


def test_a_flux_run_with_cpu_offload_checkpointing_trains_exactly_as_without(flux_files, data, tmp_path, monkeypatch):
    calls = []
    real = flux_forward.offloaded_checkpoint
    monkeypatch.setattr(flux_forward, "offloaded_checkpoint", lambda *a: calls.append(1) or real(*a))
    plain = train(_config(flux_files, data, tmp_path / "plain"))
    assert not calls
    offloaded = train(_config(flux_files, data, tmp_path / "offloaded", cpu_offload_checkpointing=True))
    assert calls  # every checkpointed block went through it
    assert offloaded.losses == plain.losses
    assert offloaded.tensors.keys() == plain.tensors.keys()
    assert all(torch.equal(offloaded.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_kohyas_key_turns_it_on(tmp_path):
    path = tmp_path / "kohya.toml"
    path.write_text("gradient_checkpointing = true\ncpu_offload_checkpointing = true\n", encoding="utf-8")
    assert load_config(path).cpu_offload_checkpointing


def _gradient_sums(width=256, side=8, text=8):
    """(out-of-place, in-place) sums autograd makes of two same-shaped activation gradients in a
    backward through our Flux blocks with a LoRA on every Linear (the profiler's record)."""
    from torch.profiler import profile

    torch.manual_seed(0)
    transformer, network, _ = fsb.ours(width)
    x, sigma, context, pooled, guidance = fsb.inputs(side, text, width)
    with network.applied():
        out = flux_forward.flux_forward(transformer, x.to(torch.bfloat16), sigma, context, pooled, guidance)
        loss = out.float().pow(2).mean()
        with profile(record_shapes=True) as prof:
            loss.backward()
    tokens = (side // 2) ** 2 + text
    wide = {(tokens, 5 * width), (1, tokens, 5 * width)}  # a single block's linear2 input
    sums = [(e.name, tuple(e.input_shapes[0])) for e in prof.events() if e.name in ("aten::add", "aten::add_")
            and len(e.input_shapes) > 1 and tuple(e.input_shapes[0]) in wide and e.input_shapes[0] == e.input_shapes[1]]
    return [s for s in sums if s[0] == "aten::add"], [s for s in sums if s[0] == "aten::add_"]


def test_a_layer_and_its_lora_sum_their_input_gradients_in_place():
    """The frozen Linear and its LoRA take their input gradients at one 2-D tensor (flux_forward._linear):
    autograd adds the second into the first instead of allocating their sum (135 MiB at 1024 px)."""
    copies, in_place = _gradient_sums()
    assert copies == [] and len(in_place) == 1, (copies, in_place)


def test_flattened_linear_calls_change_no_loss_and_no_lora_gradient(monkeypatch):
    loss, grads = _loss_and_grads(offload=False)
    monkeypatch.setattr(flux_forward, "_linear", lambda layer, x: layer(x))  # the layers called on 3-D x
    loss_3d, grads_3d = _loss_and_grads(offload=False)
    assert torch.equal(loss, loss_3d) and grads.keys() == grads_3d.keys()
    assert all(torch.equal(grads[k], grads_3d[k]) for k in grads)


def test_the_single_blocks_concatenation_changes_no_gradient_and_frees_its_gradient_early(monkeypatch):
    loss, grads = _loss_and_grads(offload=False)
    monkeypatch.setattr(flux_forward, "_attn_mlp", lambda attn, mlp: flux_forward._cat(attn, flux_forward._gelu(mlp)))
    loss_cat, grads_cat = _loss_and_grads(offload=False)
    assert torch.equal(loss, loss_cat) and all(torch.equal(grads[k], grads_cat[k]) for k in grads)
    # attention's part of the gradient is its own tensor, not a view keeping the 5-width one alive
    a, b = torch.randn(1, 4, 2, requires_grad=True), torch.randn(1, 4, 8, requires_grad=True)
    seen = {}
    a.register_hook(lambda g: seen.update(a=g._base is None))
    b.register_hook(lambda g: seen.update(b=g._base is None))
    flux_forward._CatCopyingBack.apply(a, b).backward(torch.randn(1, 4, 10))
    assert seen == {"a": True, "b": False}


def test_the_rms_norm_backward_in_place_gives_the_same_bits():
    from engine.models.flux_lean import rms_norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 128, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.rand(128, dtype=torch.bfloat16) + 0.5
    grad = torch.randn(2, 3, 40, 128, dtype=torch.bfloat16)
    rms_norm(x, scale).backward(grad)
    # the out-of-place formula it replaced
    xf = x.detach().float()
    rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    normed = xf * rrms
    g = (grad * scale).float()
    expected = (rrms * (g - normed * (g * normed).mean(-1, keepdim=True))).to(torch.bfloat16)
    assert torch.equal(x.grad, expected)
