"""Same seed, same data: the same loss curve and the same saved LoRA, bit for bit, as the engine before
the family/objective/step redesign recorded them (parity_runs.py says what each run covers,
tests/parity_fixture.py how runs are compared and re-recorded)."""

import pytest

from parity_runs import FIXTURE, RUNS, run
from tests.parity_fixture import RECORD, Recorder, differences
from train_fixtures import pattern_dataset

recorder = Recorder(FIXTURE, list(RUNS))


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
