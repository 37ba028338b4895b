"""What the out-of-memory recovery and the NaN guard changed survives a checkpoint: a run that recovered
and is then stopped and resumed goes on with the recovered plan from its first step (it does not run
out of memory again where it did) and ends with the LoRA and metadata of a run never interrupted."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.nan_guard import BF16_ACTION, NanGuard
from engine.options import EngineOptions
from engine.train import train
from tests.engine.train_fixtures import pattern_dataset, quick_config


def _run(data, out, options=EngineOptions(), **changes):
    events = []
    result = train(quick_config(data, out, **changes), tiny_sd1(seed=3), options=options,
                   callbacks=[FunctionCallback(on_event=events.append)])
    return result, events


def _resume_copy(out_a, out_b, step: int) -> None:
    name = f"step-{step:08d}"
    shutil.copytree(out_a / "test_lora" / "checkpoints" / name, out_b / "test_lora" / "checkpoints" / name)


def test_resumed_run_starts_on_the_recovered_plan_and_equals_the_uninterrupted_run(tmp_path):
    data = pattern_dataset(tmp_path / "data")
    cfg = dict(batch_size=2, max_train_steps=5, save_steps=3, cache_latents="off", cache_text_encoder_outputs="off")
    # step 2 fails three times: checkpointing on, the batch in two parts, then latents and text cached
    straight, _ = _run(data, tmp_path / "a", EngineOptions(inject_oom_at=(2, 2, 2)), **cfg)
    changes = json.loads(straight.metadata["inplace_lora_recovery"])
    assert [c["change"] for c in changes] == ["gradient_checkpointing", "half_micro_batch", "cache_on_cpu"]
    _resume_copy(tmp_path / "a", tmp_path / "b", 3)
    resumed, events = _run(data, tmp_path / "b", resume_from_checkpoint="latest", **cfg)
    said = [e.message for e in events if e.kind == "info"]
    for change in ("gradient checkpointing turned on", "micro-batch halved: each batch of 2 is trained as 2 parts",
                   "latents and text conditioning cached in CPU memory"):
        assert any(m.startswith(f"resumed with the out-of-memory recovery of step 2: {change}") for m in said), change
    first_step = next(i for i, e in enumerate(events) if e.kind == "step")
    assert all(i < first_step for i, e in enumerate(events) if e.kind == "info" and "recovery of step 2" in e.message)
    assert resumed.steps == 5
    assert all(torch.equal(straight.tensors[k], resumed.tensors[k]) for k in straight.tensors)
    assert json.loads(resumed.metadata["inplace_lora_recovery"]) == changes


@pytest.mark.parametrize("at", [5, 3], ids=["after-the-restore", "inside-the-run-of-nan-steps"])
def test_resumed_run_keeps_what_the_nan_guard_did(tmp_path, at):
    """Steps 2-4 are non-finite: the third in a row restores the LoRA state of step 0 and halves the
    learning rate. Resumed from step 5 the run keeps the guard's record and the halved rate; resumed from
    step 3 it still counts two in a row and goes back to step 0, not to the checkpoint's state."""
    data = pattern_dataset(tmp_path / "data")
    cfg, options = dict(max_train_steps=6, save_steps=at), EngineOptions(inject_nan_at=(2, 3, 4))
    straight, _ = _run(data, tmp_path / "a", options, **cfg)
    guard = json.loads(straight.metadata["inplace_lora_nan_guard"])
    assert guard == {"skipped_steps": 3, "actions": ["learning rate halved (now 0.0005)"]}
    _resume_copy(tmp_path / "a", tmp_path / "b", at)
    resumed, events = _run(data, tmp_path / "b", options, resume_from_checkpoint="latest", **cfg)
    assert json.loads(resumed.metadata["inplace_lora_nan_guard"]) == guard
    if at == 3:
        assert any(e.message.endswith("3 non-finite steps in a row: restored the LoRA state of step 0; learning "
                                      "rate halved (now 0.0005)") for e in events if e.kind == "info")
    assert all(torch.equal(straight.tensors[k], resumed.tensors[k]) for k in straight.tensors)  # the halved lr too


def _fp16_trainer(said):
    step = SimpleNamespace(precision="fp16", use_autocast=False, cast_dtype=torch.float16)
    return SimpleNamespace(cfg=SimpleNamespace(nan_guard_steps=0), precision="fp16", step=step, scaler=object(),
                           device=torch.device("cuda"), events=SimpleNamespace(emit=lambda kind, **k: said.append(k)))


def test_a_run_that_switched_to_bf16_resumes_in_bf16(monkeypatch):
    state = {"skipped": 6, "in_a_row": 0, "restores": 1, "actions": [BF16_ACTION], "bf16": True, "good_since": 0}
    said = []
    trainer = _fp16_trainer(said)
    monkeypatch.setattr(NanGuard, "_bf16_possible", lambda self: True)
    guard = NanGuard(trainer)
    guard.resume(state)
    assert (trainer.precision, trainer.step.precision, trainer.scaler) == ("bf16", "bf16", None)
    assert trainer.step.use_autocast and trainer.step.cast_dtype == torch.bfloat16
    assert said[-1]["message"] == ("NaN guard: resumed in bf16: the run had switched from fp16 to bf16 before "
                                   "the checkpoint")
    assert guard.state() == state
    monkeypatch.setattr(NanGuard, "_bf16_possible", lambda self: False)  # resumed on a device without bf16
    trainer = _fp16_trainer(said)
    NanGuard(trainer).resume(state)
    assert trainer.precision == "fp16" and "does not compute bf16: resumed in fp16" in said[-1]["message"]
