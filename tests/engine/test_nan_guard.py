"""The NaN guard (engine/nan_guard.py) with injected non-finite losses on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import checkpoint_dirs
from engine.errors import NonFiniteLoss
from engine.events import FunctionCallback
from engine.lora.kohya_io import read_lora
from engine.models import tiny_sd1
from engine.options import EngineOptions
from engine.train import train
from tests.engine.train_fixtures import model_fingerprint, pattern_dataset, quick_config


@pytest.fixture
def data(tmp_path):
    return pattern_dataset(tmp_path / "data")


def _run(data, out, options, model=None, **changes):
    infos = []
    cfg = quick_config(data, out, **changes)
    result = train(cfg, model or tiny_sd1(seed=3), options=options,
                   callbacks=[FunctionCallback(lambda e: infos.append(e.message) if e.kind == "info" else None)])
    return result, [m for m in infos if m.startswith("NaN guard")]


def _weights(folder):
    tensors, _ = read_lora(next(folder.glob("*.safetensors")))
    return tensors


def test_a_non_finite_step_is_not_applied(data, tmp_path):
    result, said = _run(data, tmp_path, EngineOptions(inject_nan_at=(3,)), max_train_steps=5, save_steps=1,
                        save_last_n_checkpoints=0)
    assert result.steps == 5 and all(torch.isfinite(v).all() for v in result.tensors.values())
    assert said == ["NaN guard: step 3: its loss or gradients are not finite; the update was skipped (1 in a row)"]
    folders = {f.name: f for f in checkpoint_dirs(tmp_path / "test_lora" / "checkpoints")}
    after_2, after_3 = _weights(folders["step-00000002"]), _weights(folders["step-00000003"])
    assert all(torch.equal(after_2[k], after_3[k]) for k in after_2)  # step 3 changed nothing
    after_4 = _weights(folders["step-00000004"])
    assert not all(torch.equal(after_3[k], after_4[k]) for k in after_3)  # and training went on
    assert json.loads(result.metadata["inplace_lora_nan_guard"]) == {"skipped_steps": 1, "actions": []}
    assert all(map(lambda v: v == v, result.losses)) and len(result.losses) == 4  # the skipped step's NaN left out


def test_steps_in_a_row_restore_the_last_good_state_and_halve_the_learning_rate(data, tmp_path):
    result, said = _run(data, tmp_path, EngineOptions(inject_nan_at=(2, 3, 4)), max_train_steps=6)
    assert result.steps == 6 and all(torch.isfinite(v).all() for v in result.tensors.values())
    assert said[-1] == ("NaN guard: 3 non-finite steps in a row: restored the LoRA state of step 0; learning rate "
                        "halved (now 0.0005)")
    assert json.loads(result.metadata["inplace_lora_nan_guard"])["actions"] == ["learning rate halved (now 0.0005)"]


def test_cuda_graph_step_restores_and_goes_on_with_the_plain_step(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    result, said = _run(data, tmp_path, EngineOptions(inject_nan_at=(2,), fast_step_without_graph=True),
                        model=model, max_train_steps=5)
    assert model_fingerprint(model) == before
    assert result.steps == 5 and all(torch.isfinite(v).all() for v in result.tensors.values())
    assert len(said) == 1 and "in the CUDA-graph step, whose updates cannot be skipped" in said[0]
    assert "restored the LoRA state of step 0" in said[0]
    assert result.fast_steps == 0  # the graph was dropped


def test_a_model_that_gives_nan_whatever_the_lora_stops_the_run(data, tmp_path):
    model = tiny_sd1()

    def poison(event):
        if event.kind == "step" and event.step == 2:
            with torch.no_grad():
                next(model.unet.parameters()).fill_(float("nan"))

    cfg = quick_config(data, tmp_path, max_train_steps=20)
    with pytest.raises(NonFiniteLoss, match="restored the last good LoRA state 3 times"):
        train(cfg, model, callbacks=[FunctionCallback(on_event=poison)])


def test_guard_off_is_a_config_field():
    from engine.config import TrainConfig

    assert TrainConfig().nan_guard_steps == 3
    assert TrainConfig.from_dict({"nan_guard_steps": 0}).nan_guard_steps == 0
