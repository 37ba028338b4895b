"""Training through the A1111 adapter gives the recorded loss curve and LoRA bit for bit: the adapter's
schedule, conditioning (SDXL's size vector) and v-prediction reach the loss as the engine last recorded
them (fixtures/recorded_runs.json) and, with the noise generator seeded as it was then, as they did before
the family/objective/step redesign (fixtures/redesign_parity.json; tests/parity_fixture.py says how runs
are compared and re-recorded)."""

from pathlib import Path

import pytest

import engine.train as train_module
from engine.config import TrainConfig
from engine.lora.kohya_io import read_lora
from engine.train import train
from fake_models import FakeSD1, FakeSD2, FakeSDXL
from fake_webui import load_model
from inplace_lora_a1111.adapter import A1111Model
from tests.parity_fixture import (CURRENT, PRE_REDESIGN, RECORD, Recorder, differences, one_thread, result_record,
                                  seed_as_noise_seed)

RUNS = {"sd1_te": (FakeSD1, "eps", dict(train_text_encoder=True, noise_offset=0.05)),
        "sd2v_snr": (FakeSD2, "v", dict(min_snr_gamma=5.0)),
        "sdxl_te_snr": (FakeSDXL, "eps", dict(train_text_encoder=True, min_snr_gamma=5.0, noise_offset=0.05))}
recorder = Recorder(Path(__file__).parent / "fixtures" / CURRENT, list(RUNS))
pre_redesign = Recorder(Path(__file__).parent / "fixtures" / PRE_REDESIGN, list(RUNS))  # never re-recorded


@pytest.mark.parametrize("name", list(RUNS))
def test_a1111_run_matches_the_recorded_one(name, webui, dataset, tmp_path):
    got = a1111_run(name, webui, dataset, tmp_path)
    if RECORD:
        recorder.record(name, got)
        pytest.fail(f"recorded {name}; unset INPLACE_LORA_RECORD_PARITY to compare")
    assert not differences(got, recorder.load(), name), differences(got, recorder.load(), name)


@pytest.mark.parametrize("name", list(RUNS))
def test_a1111_run_with_the_old_noise_seed_matches_the_pre_redesign_engine(name, webui, dataset, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(train_module, "noise_seed", seed_as_noise_seed)
    got = a1111_run(name, webui, dataset, tmp_path)
    assert not differences(got, pre_redesign.load(), name), differences(got, pre_redesign.load(), name)


def a1111_run(name, webui, dataset, tmp_path) -> dict:
    make, parameterization, changes = RUNS[name]
    sd = make(webui.shared.opts)
    sd.parameterization = parameterization
    load_model(webui, sd)
    cfg = TrainConfig(train_data_dir=str(dataset), output_dir=str(tmp_path), output_name="t", resolution="64",
                      batch_size=2, max_train_steps=3, lora_rank=4, learning_rate=1e-3, seed=7,
                      save_every_n_epochs=0, save_precision="fp32", lr_scheduler="cosine", warmup_steps=1,
                      **changes)
    with one_thread():
        result = train(cfg, A1111Model(sd))
    tensors, metadata = read_lora(result.lora_path)
    return result_record(result.losses, tensors, metadata)
