"""The validation loss (validation_data_dir / validation_split, validate_every_n_steps/epochs): held-out
images never train, the value is the same in two runs with the same seed and at two evaluations of the
same weights, it is the training loss at kohya's fixed timesteps, and it reaches TensorBoard and the plot."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine.config import ConfigError, TrainConfig
from engine.data import TrainData
from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.plot import loss_plot
from engine.train import train
from engine.validation import TIMESTEPS, fixed_draws

from train_fixtures import pattern_dataset, quick_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("val"), n=5)


def test_a_split_holds_images_out_of_training_the_same_way_every_time(data):
    cfg = TrainConfig(train_data_dir=str(data), validation_split=0.4, resolution="64")
    a = TrainData(cfg, native_resolution=64, model_key="k", train_text_encoder=False)
    b = TrainData(cfg, native_resolution=64, model_key="k", train_text_encoder=False)
    assert len(a.held_out) == 2 and a.held_out == b.held_out
    assert not a.held_out & {r.path for r in a.records} and len(a.records) == 3
    other = TrainData(cfg.replace(validation_seed=7), native_resolution=64, model_key="k", train_text_encoder=False)
    assert len(other.held_out) == 2
    with pytest.raises(ConfigError, match="validation_split"):
        TrainConfig.from_dict({"validation_split": 1.0})


def test_fixed_draws_are_kohyas_timesteps_and_repeat():
    class Step:
        device = torch.device("cpu")
        objective = tiny_sd1().objective()

    latents = torch.zeros(2, 4, 8, 8)
    first = fixed_draws(Step, latents, 42, 0, 400)
    again = fixed_draws(Step, latents, 42, 0, 400)
    assert torch.equal(first["t"], torch.tensor([400, 400])) and torch.equal(first["noise"], again["noise"])
    assert not torch.equal(first["noise"], fixed_draws(Step, latents, 42, 1, 400)["noise"])
    assert TIMESTEPS == (200, 400, 600, 800)


def _run(data, out, **changes):
    events = []
    opts = dict(max_train_steps=4, validation_split=0.4, validate_every_n_steps=2, validate_every_n_epochs=0,
                log_with="tensorboard")
    opts.update(changes)
    result = train(quick_config(data, out, **opts), tiny_sd1(),
                   callbacks=[FunctionCallback(lambda e: events.append(e) if e.kind == "validation" else None)])
    return result, events


def test_the_validation_loss_is_deterministic_across_runs_and_reported(data, tmp_path):
    first, events = _run(data, tmp_path / "a")
    second, _ = _run(data, tmp_path / "b")
    assert [s for s, _ in first.validation] == [2, 4]
    assert first.validation == second.validation  # bit for bit: same seed, same held-out images, same draws
    assert [(e.step, e.loss) for e in events] == first.validation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "a" / "test_lora" / "logs"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("loss/validation")] == first.validation
    # an untrained LoRA gives the base model's validation loss; training moves it
    untrained, _ = _run(data, tmp_path / "c", learning_rate=0.0)
    assert untrained.validation[0][1] == untrained.validation[1][1] != first.validation[1][1]


def test_a_validation_folder_and_the_plot(data, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    for name in ("img0.png", "img0.txt"):
        shutil.copy(data / name, folder / name)
    result, _ = _run(data, tmp_path / "run", validation_split=0.0, validation_data_dir=str(folder), log_with="",
                     validate_every_n_steps=0, validate_every_n_epochs=1)
    assert result.validation and result.validation[-1][0] == 4  # every epoch, and at the end
    plain = loss_plot([1.0, 0.9, 0.8, 0.7])
    with_val = loss_plot([1.0, 0.9, 0.8, 0.7], validation=[(2, 0.95), (4, 0.85)])
    assert plain.tobytes() != with_val.tobytes()
    pixels = np.asarray(with_val)
    assert int((pixels == (20, 150, 60)).all(-1).sum()) > 20  # the validation points and line
