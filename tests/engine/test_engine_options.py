"""Engine options switch one optimisation off for a benchmark (bench/ours.py's ours-host-geglu,
ours-copy-up, ours-cast-each) through `train(..., options=)`: each reaches the code it names, the run
is the same run otherwise, and every bench tool gets the options it is documented to measure."""

import pytest

import engine.lora.network as network_module
import engine.models.geglu as geglu
from engine.models import tiny_sd1
from engine.options import EngineOptions
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("options"), n=2)


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_lean_geglu_is_on_by_default_and_off_by_option(data, tmp_path, monkeypatch):
    applied = []
    original = geglu.LeanGEGLU.apply
    monkeypatch.setattr(geglu.LeanGEGLU, "apply", lambda *a: applied.append(1) or original(*a))
    train(quick_config(data, tmp_path / "on", max_train_steps=1), tiny_sd1())
    assert applied
    applied.clear()
    train(quick_config(data, tmp_path / "off", max_train_steps=1), tiny_sd1(), options=EngineOptions(lean_geglu=False))
    assert not applied


def test_up_in_place_is_on_by_default_and_off_by_option(data, tmp_path, monkeypatch):
    calls = _spy(monkeypatch, network_module, "add_up")
    plain = train(quick_config(data, tmp_path / "on", max_train_steps=2), tiny_sd1())
    assert any(args[4] for args in calls)  # in_place
    calls.clear()
    copied = train(quick_config(data, tmp_path / "off", max_train_steps=2), tiny_sd1(),
                   options=EngineOptions(up_in_place=False))
    assert calls and not any(args[4] for args in calls)
    assert copied.losses == pytest.approx(plain.losses, rel=1e-6)


def test_cast_together_is_used_unless_switched_off(data, tmp_path, monkeypatch):
    """With bf16 (the casts run only in a mixed-precision step) on the CPU."""
    calls = _spy(monkeypatch, network_module, "cast_together")
    opts = dict(max_train_steps=1, mixed_precision="bf16", device="cpu")
    train(quick_config(data, tmp_path / "on", **opts), tiny_sd1())
    assert calls
    calls.clear()
    train(quick_config(data, tmp_path / "off", **opts), tiny_sd1(), options=EngineOptions(cast_together=False))
    assert not calls


def test_bench_tools_select_the_options_they_measure(monkeypatch, tmp_path):
    """bench/ours.py passes each tool's EngineOptions to train(): nothing is patched in the engine."""
    import engine.train as train_module
    from bench import ours, ours_comfy
    from bench.common import Config

    assert ours_comfy.run_config is ours.run_config  # the ComfyUI rows run through the same plumbing
    assert ours.engine_options("ours") == EngineOptions()
    assert ours.engine_options("ours-host-geglu") == EngineOptions(lean_geglu=False)
    assert ours.engine_options("ours-copy-up") == EngineOptions(up_in_place=False)
    assert ours.engine_options("ours-cast-each") == EngineOptions(cast_together=False)
    assert ours.engine_options("ours-flux-keep-all") == EngineOptions(lean_flux=False)
    seen = []

    def fake_train(cfg, model, *, callbacks=(), options=None, **kw):
        seen.append(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(ours, "image_folder", lambda root, model: tmp_path)
    for tool in ("ours", "ours-copy-up"):
        cfg = Config(tool=tool, model="sd15", batch=1, gradient_checkpointing=False, cached=True, steps=1, warmup=1)
        with pytest.raises(RuntimeError, match="stop here"):
            ours.run_config(None, cfg, tmp_path)
    assert seen == [EngineOptions(), EngineOptions(up_in_place=False)]
