"""The lean GEGLU: same numbers as the hosts' GEGLU, less held for backward, host modules given back."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from torch import nn

from engine.models.geglu import lean_geglu
from engine.models.tiny import tiny_sd1


class GEGLU(nn.Module):
    """ldm's (A1111) and ComfyUI's GEGLU, verbatim in what it computes."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


def _run(mod, x, delta, lean: bool):
    """Forward and backward through `mod` with a LoRA-like delta hooked on its proj, as training does."""
    hook = mod.proj.register_forward_hook(lambda m, args, out: out + delta(args[0]))
    x = x.detach().clone().requires_grad_(True)
    delta.zero_grad(set_to_none=True)
    try:
        with lean_geglu(mod if lean else None):
            out = mod(x)
            (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    finally:
        hook.remove()
    return out.detach(), x.grad, delta.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("host", [DiffusersGEGLU, GEGLU])
def test_lean_geglu_gives_the_hosts_output_and_gradients_bit_for_bit(host, dtype):
    torch.manual_seed(0)
    mod = host(12, 20).to(dtype).requires_grad_(False)
    delta = nn.Linear(12, 40, bias=False).to(dtype)
    x = torch.randn(3, 7, 12, dtype=dtype)
    own = _run(mod, x, delta, lean=False)
    lean = _run(mod, x, delta, lean=True)
    for a, b in zip(own, lean):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert lean[2].abs().sum() > 0


def _held_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_lean_geglu_holds_the_projection_only():
    """The host's GEGLU keeps the projection and gelu(gate); the lean one the projection: half of it less."""
    mod = GEGLU(16, 64).requires_grad_(False)
    x = torch.randn(2, 50, 16, requires_grad=True)
    own = _held_bytes(lambda: mod(x))
    with lean_geglu(mod):
        lean = _held_bytes(lambda: mod(x))
    gelu_out = 2 * 50 * 64 * 4
    assert own - lean == gelu_out


def test_training_session_patches_every_geglu_and_gives_the_forwards_back():
    model = tiny_sd1(seed=0)
    gegluses = [m for m in model.unet.modules() if type(m).__name__ == "GEGLU"]
    assert gegluses
    with lean_geglu(model.unet) as n:
        assert n == len(gegluses) and all("forward" in m.__dict__ for m in gegluses)
        with torch.no_grad():  # previews run the host's own forward
            x = torch.randn(1, 4, gegluses[0].proj.in_features)
            assert torch.equal(gegluses[0](x), type(gegluses[0]).forward(gegluses[0], x))
    assert all("forward" not in m.__dict__ for m in gegluses)


def test_a_geglu_someone_already_patched_is_left_alone():
    mod = GEGLU(4, 4)
    mod.forward = lambda x: x  # another tool's instance patch
    with lean_geglu(mod) as n:
        assert n == 0
    assert mod.forward(torch.ones(1)) == 1


def test_training_runs_every_geglu_through_the_lean_one(tmp_path, monkeypatch):
    from engine.models import geglu
    from engine.train import train
    from train_fixtures import pattern_dataset, quick_config

    calls = []
    original = geglu.LeanGEGLU.apply
    monkeypatch.setattr(geglu.LeanGEGLU, "apply", lambda *a: calls.append(1) or original(*a))
    model = tiny_sd1(seed=0)
    n = sum(type(m).__name__ == "GEGLU" for m in model.unet.modules())
    train(quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=2, batch_size=1), model)
    assert len(calls) == 2 * n  # every GEGLU, each step
    assert not any("forward" in m.__dict__ for m in model.unet.modules())
