"""Same seed, same data: the same loss curve and the same saved LoRA, bit for bit, as recorded
(parity_runs.py says what each run covers, tests/parity_fixture.py how runs are compared and
re-recorded): as the engine last recorded them, and, with the noise generator seeded as it was then
and the fast step's CPU learning rate in float32 as it was then, as the engine before the
family/objective/step redesign recorded them."""

import pytest
import torch

import engine.fast_step as fast_step
import engine.train as train_module
from parity_runs import FIXTURE, PRE_REDESIGN_FIXTURE, RUNS, run
from tests.parity_fixture import RECORD, Recorder, differences, seed_as_noise_seed
from train_fixtures import pattern_dataset

recorder = Recorder(FIXTURE, list(RUNS))
pre_redesign = Recorder(PRE_REDESIGN_FIXTURE, list(RUNS))  # compared with, never re-recorded


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("parity"), n=4)


@pytest.mark.parametrize("name", list(RUNS))
def test_run_matches_the_recorded_one(name, data, tmp_path):
    got = run(name, data, tmp_path)
    if RECORD:
        recorder.record(name, got)
        pytest.fail(f"recorded {name}; unset INPLACE_LORA_RECORD_PARITY to compare")
    assert not differences(got, recorder.load(), name), differences(got, recorder.load(), name)


@pytest.mark.parametrize("name", list(RUNS))
def test_run_with_the_old_noise_seed_matches_the_pre_redesign_engine(name, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "noise_seed", seed_as_noise_seed)
    # that engine's fast step held the CPU learning rate in float32 (AdamW's scalars rounded to it); the
    # float64 tensor now makes the fast step train bit for bit like the plain one (FastStep._tensor_lr)
    monkeypatch.setattr(fast_step, "CPU_LR_DTYPE", torch.float32)
    got = run(name, data, tmp_path)
    assert not differences(got, pre_redesign.load(), name), differences(got, pre_redesign.load(), name)
