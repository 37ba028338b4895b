"""fp8_base: a model the engine loads keeps its UNet's Linear/Conv2d weights in float8 while it
trains (kohya's --fp8_base), computes each layer in bf16, and learns on the bf16 loss curve.
A host's model is never converted."""

from types import SimpleNamespace

import pytest
import torch

from engine.errors import ConfigError
from engine.events import FunctionCallback
from engine.lora.kohya_io import read_lora
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("fp8"), n=4)


@pytest.fixture
def loads_tiny(monkeypatch, tmp_path):
    """`base_model` resolves to a tiny SD1 model in the dtype the engine asks for (what
    load_base_model gives for a real file); returns the base path and the models it made."""
    made = []

    def load(path, *, device, dtype, **kwargs):
        model = tiny_sd1()
        for module in (model.unet, *model.text_encoders):
            module.to(dtype)
        model.dtype = dtype
        made.append(model)
        return model

    monkeypatch.setattr("engine.models.load.load_base_model", load)
    monkeypatch.setattr("engine.models.detect.detect_path", lambda p: SimpleNamespace(
        family="sd1", v_pred_marker=False, scheduler_prediction_type=None))
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"x")
    return base, made


def test_fp8_base_trains_on_the_bf16_curve_and_previews(data, tmp_path, loads_tiny):
    base, made = loads_tiny
    opts = dict(base_model=str(base), max_train_steps=6, batch_size=2, mixed_precision="bf16", device="cpu",
                seed=3, gradient_checkpointing=True)
    plain = train(quick_config(data, tmp_path / "bf16", **opts))
    seen = {}

    def on_start(event):
        if event.kind == "start":
            unet = made[-1].unet
            seen["fp8"] = [n for n, p in unet.named_parameters() if p.dtype == FP8]
            seen["kept"] = (unet.conv_in.weight.dtype, unet.conv_out.weight.dtype)

    fp8 = train(quick_config(data, tmp_path / "fp8", fp8_base=True, sample_prompts=["stripes 1"],
                             sample_every_n_steps=6, **opts), callbacks=[FunctionCallback(on_start)])
    linear_weights = [n for n, m in made[-1].unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(seen["fp8"]) >= len(linear_weights) > 0
    assert all(n.endswith(".weight") for n in seen["fp8"])
    assert seen["kept"] == (torch.bfloat16, torch.bfloat16)
    # same seed, same noise: the curves differ only by the rounding of the base weights to fp8
    assert len(fp8.losses) == len(plain.losses) == 6
    worst = max(abs(a - b) / abs(b) for a, b in zip(fp8.losses, plain.losses))
    assert worst < 0.05, (fp8.losses, plain.losses)
    ups = [v for k, v in fp8.tensors.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # it trained
    tensors, metadata = read_lora(fp8.lora_path)
    assert metadata["ss_fp8_base"] == "True" and all(v.dtype == torch.float32 for v in tensors.values())
    assert list((tmp_path / "fp8" / "test_lora" / "samples").glob("*.png"))  # the preview ran with the fp8 layers


def test_fp8_base_needs_bf16_or_fp16(data, tmp_path, loads_tiny):
    base, made = loads_tiny
    with pytest.raises(ConfigError, match="mixed_precision: bf16"):
        train(quick_config(data, tmp_path, base_model=str(base), fp8_base=True, mixed_precision="no", device="cpu"))
    assert not made  # refused before the model was loaded


def test_fp8_base_never_converts_a_hosts_model(data, tmp_path):
    model = tiny_sd1()
    before = {n: p.dtype for n, p in model.unet.named_parameters()}
    with pytest.raises(ConfigError, match="comes from the host"):
        train(quick_config(data, tmp_path, fp8_base=True, mixed_precision="bf16", device="cpu"), model)
    assert {n: p.dtype for n, p in model.unet.named_parameters()} == before
