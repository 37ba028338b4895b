"""The options users pick: every optimizer and schedule runs, v-prediction trains, previews and
TensorBoard logs are written, and Ctrl-C in the CLI keeps a checkpoint and says how to resume."""

import pytest
import torch

from engine.__main__ import main
from engine.config import SCHEDULERS, TrainConfig
from engine.errors import ConfigError
from engine.models import tiny_sd1
from engine.optim import build_optimizer, build_scheduler, param_groups, warmup_count
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("opts"), n=2)


@pytest.mark.parametrize("optimizer", ["AdamW", "Lion", "Adafactor", "Prodigy"])
def test_each_optimizer_trains(data, tmp_path, optimizer):
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    result = train(quick_config(data, tmp_path, max_train_steps=3, optimizer=optimizer, learning_rate=lr), tiny_sd1())
    ups = [v for k, v in result.tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in ups) and any(v.abs().sum() > 0 for v in ups)


def test_adamw8bit_on_cpu_says_what_to_use():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_optimizer(TrainConfig(optimizer="AdamW8bit"), [{"params": [p]}], torch.device("cpu"))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedules_warm_up_and_follow_their_shape(name):
    cfg = TrainConfig(lr_scheduler=name, warmup_steps=0.1, learning_rate=1.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, param_groups(cfg, [p], []), torch.device("cpu"))
    sched = build_scheduler(cfg, opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name == "constant":
        assert set(lrs) == {1.0}
    else:
        assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.1


def test_warmup_is_a_count_or_a_ratio():
    assert warmup_count(TrainConfig(warmup_steps=0.05), 1000) == 50
    assert warmup_count(TrainConfig(warmup_steps=30), 1000) == 30


def test_v_prediction_trains(data, tmp_path):
    model = tiny_sd1()
    cfg = quick_config(data, tmp_path, max_train_steps=3, prediction_type="v_prediction")
    result = train(cfg, model)
    assert model.info.prediction_type == "v_prediction" and len(result.losses) == 3


def test_previews_and_tensorboard(data, tmp_path):
    events = []
    from engine.events import FunctionCallback

    cfg = quick_config(data, tmp_path, max_train_steps=4, sample_prompts=["stripes --d 5"], sample_every_n_steps=2,
                       sample_steps=2, log_with="tensorboard")
    train(cfg, tiny_sd1(), callbacks=[FunctionCallback(on_event=events.append)])
    previews = [e for e in events if e.kind == "preview"]
    assert [e.step for e in previews] == [2, 4] and previews[0].images[0].size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "test_lora" / "samples").iterdir()) == ["step000002_00.png", "step000004_00.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "test_lora" / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "preview/0" in acc.Tags()["images"]


def test_preview_out_of_memory_skips_the_preview_and_training_goes_on(data, tmp_path, monkeypatch):
    """Sampling needs more memory than training (encoders back, its own activations): a preview that
    does not fit must not end a run that fits."""
    import engine.run_output as run_output
    from engine.events import FunctionCallback

    calls = []

    def oom(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_output, "render_previews", oom)
    events = []
    cfg = quick_config(data, tmp_path, max_train_steps=4, sample_prompts=["stripes"], sample_every_n_steps=2)
    result = train(cfg, tiny_sd1(), callbacks=[FunctionCallback(on_event=events.append)])
    assert len(calls) == 2 and result.steps == 4 and result.lora_path.exists()
    skipped = [e.message for e in events if e.kind == "info" and "skipped: out of memory" in (e.message or "")]
    assert [m.split(" skipped")[0] for m in skipped] == ["preview at step 2", "preview at step 4"]
    assert sum("preview at step" in w for w in result.warnings) == 1
    assert not [e for e in events if e.kind in ("error", "preview")]


def test_ctrl_c_keeps_a_checkpoint_and_prints_how_to_resume(data, tmp_path, monkeypatch, capsys):
    from engine import progress

    original = progress.ConsoleProgress.on_event

    def interrupt(self, event):
        original(self, event)
        if event.kind == "step" and event.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.ConsoleProgress, "on_event", interrupt)
    model = tiny_sd1()
    monkeypatch.setattr("engine.models.load.load_base_model", lambda *a, **k: model)
    monkeypatch.setattr("engine.models.detect.detect_path", lambda p: type("D", (), {"family": "sd1", "v_pred_marker": False, "scheduler_prediction_type": None})())
    fake_base = tmp_path / "base.safetensors"
    fake_base.write_bytes(b"x")
    code = main(["train", "--set", f"train_data_dir={data}", "--set", f"base_model={fake_base}", "--set", f"output_dir={tmp_path}",
                 "--set", "max_train_steps=5", "--set", "resolution=64"])
    assert code == 130
    out = capsys.readouterr().out
    assert "stopped at step 2; checkpoint kept in " in out and "step-00000002" in out
    assert "--set resume_from_checkpoint=latest" in out
    assert (tmp_path / "my_lora" / "checkpoints" / "step-00000002").is_dir()
