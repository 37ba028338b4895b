"""fp8_base saves memory without gradient checkpointing too: an fp8 layer keeps its fp8 weight for
backward, not a bf16 copy of it, and the model runs natively in bf16 like a bf16 model. Its LoRA
learns what the autocast path learned, and the fp8 weights come out of training untouched."""

import copy

import pytest
import torch
from torch import nn

from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.models.fp8 import FP8, store_in_fp8
from engine.options import EngineOptions
from engine.lora.network import LoRANetwork
from engine.train import train

from test_fp8_base import data, loads_tiny  # noqa: F401 - fixtures
from train_fixtures import quick_config

BF16 = torch.bfloat16


def _bf16_model():
    model = tiny_sd1(seed=1)
    for module in (model.unet, *model.text_encoders):
        module.to(BF16)
    model.dtype = BF16
    return model


def _as_before(unet: nn.Module) -> nn.Module:
    """The fp8 model as fp8_base left it before: plain Linear/Conv2d layers holding fp8 weights."""
    for layer in unet.modules():
        if isinstance(layer, nn.Linear):
            layer.__class__ = nn.Linear
        elif isinstance(layer, nn.Conv2d):
            layer.__class__ = nn.Conv2d
    return unet


def _forward_saves(model, *, autocast: bool):
    """What autograd keeps for backward during one training forward (input needs grad, as LoRA's
    layers make it): (bytes of saved tensors that are not parameters, the saved tensors)."""
    params = {p.data_ptr() for p in model.unet.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g).to(BF16).requires_grad_(True)
    with torch.no_grad():
        cond = model.encode_text(["stripes", "dots"])
    steps = torch.tensor([100, 700])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = model.predict(x, steps, cond)
    out.float().square().mean().backward()
    seen, total = set(), 0
    for t in saved:
        key = t.untyped_storage().data_ptr()
        if key in params or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total, saved


def _weight_copies(saved, unet):
    """The saved tensors that are a bf16 copy of some fp8 weight (as stored, or transposed as F.linear
    keeps it)."""
    forms = {}
    for w in (p for p in unet.parameters() if p.dtype == FP8):
        w16 = w.to(BF16)
        for form in (w16, w16.t()) if w.dim() == 2 else (w16,):
            forms.setdefault(tuple(form.shape), []).append(form)
    return [t for t in saved if t.dtype == BF16
            and any(torch.equal(t, form) for form in forms.get(tuple(t.shape), ()))]


def test_fp8_forward_keeps_no_bf16_weight_copy_and_no_more_than_bf16():
    plain = _bf16_model()
    fp8 = copy.deepcopy(plain)
    store_in_fp8(fp8.unet)
    bf16_bytes, _ = _forward_saves(plain, autocast=False)
    fp8_bytes, saved = _forward_saves(fp8, autocast=False)  # the engine now runs it natively
    assert not _weight_copies(saved, fp8.unet)
    assert fp8_bytes <= bf16_bytes, (fp8_bytes, bf16_bytes)
    # under autocast too (fp16 runs, autocast: always): the layers keep their fp8 weight, not a copy
    _, saved = _forward_saves(fp8, autocast=True)
    assert not _weight_copies(saved, fp8.unet)
    # what fp8_base did before: plain layers under autocast kept a bf16 copy of every weight
    old = _as_before(copy.deepcopy(fp8).unet)
    fp8.unet = old
    old_bytes, saved = _forward_saves(fp8, autocast=True)
    # (the time embedding and the text keys/values see no input that needs grad: nothing kept there)
    assert len(_weight_copies(saved, old)) >= 0.6 * sum(p.dtype == FP8 for p in old.parameters())
    assert old_bytes > bf16_bytes


def _lora_grads(model, autocast: bool):
    """The LoRA up-projection gradients and the output of one step, LoRA on every Linear/Conv2d layer."""
    torch.manual_seed(0)
    network = LoRANetwork()
    for name, layer in model.unet.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            network.add(name.replace(".", "_"), layer, 4, 4.0)
    network.attach()
    try:
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(BF16)
        with torch.no_grad():
            cond = model.encode_text(["stripes", "dots"])
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = model.predict(x, torch.tensor([100, 700]), cond)
        out.float().square().mean().backward()
    finally:
        network.detach()
    return out.float(), {k: m.lora_up.weight.grad for k, m in network.loras.items()}


def test_fp8_layers_give_the_autocast_paths_lora_gradients():
    model = _bf16_model()
    store_in_fp8(model.unet)
    old = copy.deepcopy(model)
    _as_before(old.unet)
    out, grads = _lora_grads(model, autocast=False)  # the engine's native bf16 step
    out_old, grads_old = _lora_grads(old, autocast=True)  # fp8_base's autocast step before
    assert torch.allclose(out, out_old, rtol=0.05, atol=0.05)
    assert grads.keys() == grads_old.keys() and len(grads) > 50
    for key, g in grads_old.items():
        assert (grads[key] - g).norm() <= 0.05 * g.norm() + 1e-6, key


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_base_trains_natively_as_autocast_did(data, tmp_path, loads_tiny, monkeypatch,  # noqa: F811
                                                  checkpointing):
    base, made = loads_tiny
    opts = dict(base_model=str(base), max_train_steps=3, batch_size=2, mixed_precision="bf16", device="cpu",
                seed=3, fp8_base=True, gradient_checkpointing=checkpointing)
    seen = {}

    def on_start(event):
        if event.kind == "start":
            seen["message"] = event.message
            seen["fp8"] = {n: p.detach().clone() for n, p in made[-1].unet.named_parameters() if p.dtype == FP8}

    new = train(quick_config(data, tmp_path / "new", **opts), callbacks=[FunctionCallback(on_start)])
    assert "native, no autocast" in seen["message"]
    after = {n: p for n, p in made[-1].unet.named_parameters() if p.dtype == FP8}
    assert after.keys() == seen["fp8"].keys() and len(after) > 50
    assert all(torch.equal(after[n].view(torch.uint8), w.view(torch.uint8)) for n, w in seen["fp8"].items())

    def store_as_before(unet):  # fp8 weights in plain layers: computes_in sees them, autocast stays on
        sizes = store_in_fp8(unet)
        _as_before(unet)
        return sizes

    monkeypatch.setattr("engine.models.fp8.store_in_fp8", store_as_before)
    old = train(quick_config(data, tmp_path / "old", **opts), callbacks=[FunctionCallback(on_start)])
    assert "native, no autocast" not in seen["message"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(new.losses, old.losses))
    assert worst < 0.03, (new.losses, old.losses)


def test_fp8_base_compiles_and_runs_the_fast_step(data, tmp_path, loads_tiny):  # noqa: F811
    """The fp8 layers' Functions trace under torch.compile (aot_eager on the CPU: Dynamo's trace and
    AOTAutograd's split, eager kernels) inside the fast step, and give the eager step's losses."""
    base, _ = loads_tiny
    opts = dict(base_model=str(base), max_train_steps=2, batch_size=2, mixed_precision="bf16", device="cpu",
                seed=3, fp8_base=True)
    plain = train(quick_config(data, tmp_path / "plain", **opts))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    said = []
    options = EngineOptions(fast_step_without_graph=True, compile_backend="aot_eager", compile_devices=("cpu",))
    compiled = train(quick_config(data, tmp_path / "compiled", torch_compile=True, **opts), options=options,
                     callbacks=[FunctionCallback(lambda e: said.append(e.message or ""))])
    assert compiled.fast_steps == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not [m for m in said if "torch_compile" in m and "without" in m], said
    for a, b in zip(plain.losses, compiled.losses):
        assert abs(a - b) <= 0.02 * abs(a), (plain.losses, compiled.losses)
