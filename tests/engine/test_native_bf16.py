"""A model whose frozen weights already are bf16 trains without autocast, on the autocast loss curve.

Autocast around a bf16 model only adds casts: norms and softmax run in float32, and every layer that
follows keeps its own bf16 copy of their outputs for the backward pass. `autocast: auto` (the default)
skips it for such a model; `autocast: always` keeps it. The loss and the optimizer stay float32 in
both. On the CPU the two curves are equal (CPU autocast runs norms in bf16 too), so here the tests
check which path runs and that the native one trains; the CUDA difference (norm outputs rounded to
bf16 once more) is measured on the GPU by `python -m bench.equivalence` (bench/README.md).
"""

import pytest
import torch

import engine.step as step_module
from engine.models import tiny_sd1, tiny_sdxl
from engine.train import train

from train_fixtures import pattern_dataset, quick_config

RTOL = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("bf16"), n=4)


def _bf16(build):
    model = build()
    for module in (model.unet, *model.text_encoders):
        module.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    return model


def _autocast_calls(monkeypatch) -> list[bool]:
    seen = []
    original = step_module.autocast

    def recording(device, precision, enabled=True):
        seen.append(enabled)
        return original(device, precision, enabled)

    monkeypatch.setattr(step_module, "autocast", recording)
    return seen


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bf16_model_trains_natively_on_the_autocast_curve(data, tmp_path, family, monkeypatch):
    build = tiny_sd1 if family == "sd1" else tiny_sdxl
    opts = dict(max_train_steps=6, batch_size=2, mixed_precision="bf16", device="cpu", seed=3)
    calls = _autocast_calls(monkeypatch)
    native = train(quick_config(data, tmp_path / "native", **opts), _bf16(build))
    assert calls and not any(calls), "autocast was entered for a bf16 model"
    calls.clear()
    cast = train(quick_config(data, tmp_path / "cast", autocast="always", **opts), _bf16(build))
    assert calls and all(calls)
    assert len(native.losses) == len(cast.losses) == 6
    for a, b in zip(native.losses, cast.losses):
        assert a == pytest.approx(b, rel=RTOL), (native.losses, cast.losses)
    ups = [v for k, v in native.tensors.items() if k.endswith("lora_up.weight")]
    assert all(v.dtype == torch.float32 for v in ups) and any(v.abs().sum() > 0 for v in ups)


def test_float32_weights_keep_autocast(data, tmp_path, monkeypatch):
    """bf16 compute over float32 weights needs autocast to run at all: `auto` keeps it."""
    calls = _autocast_calls(monkeypatch)
    train(quick_config(data, tmp_path / "fp32", max_train_steps=2, mixed_precision="bf16", device="cpu"),
          tiny_sd1())
    assert calls and all(calls)


def test_trained_text_encoder_in_another_dtype_keeps_autocast(data, tmp_path, monkeypatch):
    """Only what the step runs through counts: a float32 text encoder matters once it is trained."""
    def mixed():
        model = tiny_sd1()
        model.unet.to(torch.bfloat16)
        model.dtype = torch.bfloat16
        return model

    calls = _autocast_calls(monkeypatch)
    opts = dict(max_train_steps=2, mixed_precision="bf16", device="cpu")
    train(quick_config(data, tmp_path / "frozen_te", **opts), mixed())
    assert calls and not any(calls)
    calls.clear()
    train(quick_config(data, tmp_path / "te", train_text_encoder=True, **opts), mixed())
    assert calls and all(calls)


def test_checkpointing_casts_lora_weights_per_layer_on_the_same_curve(data, tmp_path, monkeypatch):
    """Without checkpointing every LoRA weight is cast to bf16 once per step and held; with it, each
    layer casts as it runs, so backward holds only the recomputed block's casts. Same training."""
    from engine.lora.network import LoRANetwork

    casts = []
    original = LoRANetwork.cast_weights

    def recording(self, dtype):
        casts.append(dtype)
        return original(self, dtype)

    monkeypatch.setattr(LoRANetwork, "cast_weights", recording)
    opts = dict(max_train_steps=4, batch_size=2, mixed_precision="bf16", device="cpu", seed=3)
    held = train(quick_config(data, tmp_path / "held", **opts), _bf16(tiny_sd1))
    assert casts and all(d == torch.bfloat16 for d in casts)
    casts.clear()
    per_layer = train(quick_config(data, tmp_path / "gc", gradient_checkpointing=True, **opts), _bf16(tiny_sd1))
    assert casts and all(d is None for d in casts)
    for a, b in zip(held.losses, per_layer.losses, strict=True):
        assert a == pytest.approx(b, rel=RTOL), (held.losses, per_layer.losses)
    for key, value in held.tensors.items():
        assert torch.equal(value, per_layer.tensors[key]), key
