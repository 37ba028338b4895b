"""Out-of-memory recovery (engine/memory/recovery.py) with an injected out-of-memory error on the CPU:
the run finishes on the fallback plan, its LoRA is the one a run on that plan from the same step gives,
the host model is left as it was, and the file's metadata says what changed."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import UserError
from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.options import EngineOptions
from engine.train import train
from tests.engine.train_fixtures import model_fingerprint, pattern_dataset, quick_config


@pytest.fixture
def data(tmp_path):
    return pattern_dataset(tmp_path / "data")


def _run(data, out, options=EngineOptions(), model=None, **changes):
    events = []
    cfg = quick_config(data, out, max_train_steps=5, **changes)
    result = train(cfg, model or tiny_sd1(seed=3), callbacks=[FunctionCallback(on_event=events.append)],
                   options=options)
    return result, [e.message for e in events if e.kind == "info"]


def _same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointing_plan_finishes_the_run_as_a_run_that_turned_it_on_there(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    recovered, infos = _run(data, tmp_path / "a", EngineOptions(inject_oom_at=(3,)), model=model,
                            gradient_accumulation_steps=2)
    assert model_fingerprint(model) == before  # the host's model as it was, checkpointing hooks gone
    assert recovered.steps == 5 and recovered.lora_path.exists()
    assert any(m.startswith("out of memory at step 3: gradient checkpointing turned on; training step 3 again")
               for m in infos)
    planned, _ = _run(data, tmp_path / "b", EngineOptions(recovery_plan_at=((3, "gradient_checkpointing"),)),
                      gradient_accumulation_steps=2)
    assert _same(recovered.tensors, planned.tensors)
    changes = json.loads(recovered.metadata["inplace_lora_recovery"])
    assert [(c["step"], c["change"]) for c in changes] == [(3, "gradient_checkpointing")]
    # checkpointing changes no number: the run equals one that never ran out of memory
    plain, _ = _run(data, tmp_path / "c", gradient_accumulation_steps=2)
    assert _same(recovered.tensors, plain.tensors)
    assert "inplace_lora_recovery" not in plain.metadata


def test_half_micro_batch_plan_keeps_the_images_and_noise_of_each_update(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    options = EngineOptions(inject_oom_at=(2, 2), fast_step_without_graph=True)  # the fast step dropped too
    recovered, infos = _run(data, tmp_path / "a", options, model=model, batch_size=4)
    assert model_fingerprint(model) == before
    assert recovered.steps == 5
    assert any("micro-batch halved: each batch of 4 is trained as 2 parts of 2" in m for m in infos)
    planned, _ = _run(data, tmp_path / "b", EngineOptions(
        recovery_plan_at=((2, "gradient_checkpointing"), (2, "half_micro_batch")), fast_step_without_graph=True),
        batch_size=4)
    assert _same(recovered.tensors, planned.tensors)
    changes = json.loads(recovered.metadata["inplace_lora_recovery"])
    assert [(c["step"], c["change"]) for c in changes] == [(2, "gradient_checkpointing"), (2, "half_micro_batch")]
    # the same images and draws per update: the LoRA of a run that never split, up to summation order
    plain, _ = _run(data, tmp_path / "c", batch_size=4)
    for key in plain.tensors:
        torch.testing.assert_close(recovered.tensors[key], plain.tensors[key], rtol=1e-4, atol=1e-6)
    assert recovered.losses == pytest.approx(plain.losses, rel=1e-5)


def test_no_plan_left_ends_with_a_checkpoint_and_the_advice(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    events = []
    cfg = quick_config(data, tmp_path, max_train_steps=5, batch_size=2)
    with pytest.raises(UserError, match="out of memory on cpu at step 3, with every recovery plan tried "
                                        r"\(gradient_checkpointing, half_micro_batch\)"):
        train(cfg, model, callbacks=[FunctionCallback(on_event=events.append)],
              options=EngineOptions(inject_oom_at=(3, 3, 3)))
    assert model_fingerprint(model) == before
    error = [e for e in events if e.kind == "error"][-1]
    assert error.path and error.path.endswith("step-00000002")  # the last finished step is kept


def test_the_failed_steps_tensors_are_freed_before_the_retry(data, tmp_path, monkeypatch):
    """What the failed forward held (alive through the exception's traceback) must be gone when the
    step is trained again, or a real out-of-memory error would repeat on the retry."""
    import weakref

    import engine.memory.recovery as recovery

    held = []
    original = recovery.OutOfMemoryRecovery.maybe_inject

    def inject(self, last_micro):
        step = self.trainer.position.step + 1
        if last_micro and step in self._inject:
            activations = torch.ones(1000)  # a tensor only the failing frame refers to
            held.append(weakref.ref(activations))
        original(self, last_micro)

    monkeypatch.setattr(recovery.OutOfMemoryRecovery, "maybe_inject", inject)
    seen_alive = []
    original_apply = recovery.OutOfMemoryRecovery._apply

    def apply(self, change, step, why):
        seen_alive.append(any(r() is not None for r in held))
        original_apply(self, change, step, why)

    monkeypatch.setattr(recovery.OutOfMemoryRecovery, "_apply", apply)
    result, _ = _run(data, tmp_path, EngineOptions(inject_oom_at=(2,)))
    assert result.steps == 5 and seen_alive == [False]


def test_no_plan_left_gives_the_memory_estimates_advice(data, tmp_path, monkeypatch):
    """Where the device reports its free memory (CUDA), the final error carries the estimate's advice;
    here the CPU is made to report 1 MiB free, which no setting fits."""
    import engine.memory.run as memory_run

    monkeypatch.setattr(memory_run, "free_memory", lambda device: 2**20)
    events = []
    cfg = quick_config(data, tmp_path, max_train_steps=5, batch_size=1, gradient_checkpointing=True)
    with pytest.raises(UserError, match=r"at step 2, with every recovery plan tried \(nothing\)\. Memory: needs "
                                        r"about [0-9.]+ GiB at batch 1; cpu has 0\.0 GiB free.*: it will not fit "
                                        r"even at batch 1 with gradient checkpointing.*the run can resume"):
        train(cfg, tiny_sd1(seed=3), callbacks=[FunctionCallback(on_event=events.append)],
              options=EngineOptions(inject_oom_at=(2,)))
    assert "; memory: needs about" in next(e.message for e in events if e.kind == "start")
    error = [e for e in events if e.kind == "error"][-1]
    assert error.path and error.path.endswith("step-00000001")


def test_a_bench_row_that_went_through_recovery_says_so_in_its_notes(data, tmp_path, monkeypatch):
    """bench/ours.py: a row whose run turned checkpointing on after an out-of-memory error is not a
    row without checkpointing; its notes (shown by bench/report.py) carry the recovery's events."""
    from bench import ours
    from bench.common import Config

    monkeypatch.setattr(ours, "image_folder", lambda root, model: data)
    cfg = Config(tool="ours", model="sd15", batch=2, gradient_checkpointing=False, cached=True, steps=1, warmup=1)
    row = ours.run_config(tiny_sd1(seed=3), cfg, tmp_path, options=EngineOptions(inject_oom_at=(2,)))
    assert row.steps_timed == 1 and row.error is None
    assert row.notes == ["out of memory at step 2: gradient checkpointing turned on; training step 2 again"]
    plain = ours.run_config(tiny_sd1(seed=3), cfg, tmp_path / "plain")
    assert plain.notes == []
