"""Training through the ComfyUI adapter on ComfyUI's own loaded SD1.5 (no server) gives the recorded loss
curve and LoRA bit for bit: the schedule read from ComfyUI's model_sampling, its CLIP and VAE reach the
loss as the engine last recorded them (fixtures/recorded_runs.json) and, with the noise generator seeded
as it was then, as they did before the family/objective/step redesign (fixtures/redesign_parity.json;
tests/parity_fixture.py says how runs are compared and re-recorded)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from parity_probe import RUNS  # noqa: E402
from tests.parity_fixture import CURRENT, PRE_REDESIGN, RECORD, Recorder, differences  # noqa: E402

recorder = Recorder(os.path.join(HERE, "fixtures", CURRENT), list(RUNS))
pre_redesign = Recorder(os.path.join(HERE, "fixtures", PRE_REDESIGN), list(RUNS))  # never re-recorded


@pytest.fixture(scope="module")
def comfy_runs(comfy_python, sd15_checkpoint, tmp_path_factory):
    from comfy_workflows import make_images

    data = tmp_path_factory.mktemp("parity_data")
    make_images(str(data), n=4)
    out = subprocess.run([comfy_python, os.path.join(HERE, "parity_probe.py"), sd15_checkpoint, str(data),
                          str(tmp_path_factory.mktemp("parity_out"))], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(RUNS))
def test_comfy_run_matches_the_recorded_one(comfy_runs, name):
    got = comfy_runs["current"][name]
    if RECORD:
        recorder.record(name, got)
        pytest.fail(f"recorded {name}; unset INPLACE_LORA_RECORD_PARITY to compare")
    assert not differences(got, recorder.load(), name), differences(got, recorder.load(), name)


@pytest.mark.parametrize("name", list(RUNS))
def test_comfy_run_with_the_old_noise_seed_matches_the_pre_redesign_engine(comfy_runs, name):
    got = comfy_runs["old_noise_seed"][name]
    assert not differences(got, pre_redesign.load(), name), differences(got, pre_redesign.load(), name)
