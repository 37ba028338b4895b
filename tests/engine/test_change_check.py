"""A run whose LoRA did not change ends with a warning naming the layers that got no gradient,
instead of writing a no-op file as a success; a normal run says nothing."""

import pytest

import engine.train as train_module
from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("data"), n=2)


def _silenced(monkeypatch, which):
    """Modules whose output the loss never sees (multiplier 0): as if their hooks never ran."""
    build = train_module.build_network

    def build_and_silence(model, cfg, **kw):
        network = build(model, cfg, **kw)
        for key, module in network.loras.items():
            if which(key):
                module.multiplier = 0.0
        return network

    monkeypatch.setattr(train_module, "build_network", build_and_silence)


def test_a_normal_run_says_nothing(data, tmp_path):
    result = train(quick_config(data, tmp_path, max_train_steps=2), tiny_sd1())
    assert not [w for w in result.warnings if "gradient" in w]


def test_no_gradient_anywhere_is_a_clear_warning(data, tmp_path, monkeypatch):
    _silenced(monkeypatch, lambda key: True)
    shown = []
    result = train(quick_config(data, tmp_path, max_train_steps=2), tiny_sd1(),
                   callbacks=[FunctionCallback(lambda e: shown.append(e.message) if e.kind == "info" else None)])
    warnings = [w for w in result.warnings if "did not change" in w]
    assert len(warnings) == 1 and "lora_unet_" in warnings[0] and "received a gradient" in warnings[0]
    assert shown.count(warnings[0]) == 1  # shown once, when the run ends
    assert result.lora_path.is_file()  # what was made is kept


def test_unet_layers_without_gradient_are_named(data, tmp_path, monkeypatch):
    _silenced(monkeypatch, lambda key: key.startswith("lora_unet_up_blocks_1"))
    result = train(quick_config(data, tmp_path, max_train_steps=2), tiny_sd1())
    warnings = [w for w in result.warnings if "received no gradient" in w]
    assert len(warnings) == 1 and "lora_unet_up_blocks_1" in warnings[0] and "did not change" not in warnings[0]


def test_a_frozen_text_encoder_from_network_weights_is_not_reported(data, tmp_path):
    first = train(quick_config(data, tmp_path / "a", max_train_steps=2, train_text_encoder=True), tiny_sd1())
    result = train(quick_config(data, tmp_path / "b", max_train_steps=2, network_weights=str(first.lora_path)),
                   tiny_sd1())
    assert not [w for w in result.warnings if "gradient" in w]
