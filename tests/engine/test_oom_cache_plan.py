"""The out-of-memory recovery's last plan, caching on the CPU (engine/memory/cache_plan.py), with an
injected out-of-memory error in a run that encodes its latents and captions every step: the run
finishes, its LoRA is the one a run that cached from that step on gives, the metadata says what changed
and the host model is left as it was; what cannot be cached is said, and nothing cacheable means no plan."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import UserError
from engine.models import tiny_sd1
from engine.options import EngineOptions
from tests.engine.test_oom_recovery import _run as _recovery_run
from tests.engine.test_oom_recovery import _same
from tests.engine.train_fixtures import model_fingerprint, pattern_dataset

# latents and captions encoded every step (5 steps, as test_oom_recovery's runs)
UNCACHED = dict(cache_latents="off", cache_text_encoder_outputs="off", batch_size=1)


@pytest.fixture
def data(tmp_path):
    return pattern_dataset(tmp_path / "data")


def _run(data, out, options=EngineOptions(), model=None, **changes):
    return _recovery_run(data, out, options, model, **{**UNCACHED, **changes})


def test_uncached_run_caches_on_the_cpu_and_equals_a_run_that_cached_from_that_step(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    # step 3 fails twice: checkpointing does not help, a batch of 1 cannot split, caching is what is left
    recovered, infos = _run(data, tmp_path / "a", EngineOptions(inject_oom_at=(3, 3)), model=model, flip_aug=True)
    assert model_fingerprint(model) == before
    assert recovered.steps == 5 and recovered.lora_path.exists()
    said = [m for m in infos if m.startswith("out of memory at step 3: latents and text conditioning cached")]
    assert len(said) == 1 and "the VAE and the text encoders no longer run in the step" in said[0]
    assert said[0].endswith("training step 3 again")
    changes = json.loads(recovered.metadata["inplace_lora_recovery"])
    assert [(c["step"], c["change"]) for c in changes] == [(3, "gradient_checkpointing"), (3, "cache_on_cpu")]
    assert "latents and text conditioning cached in CPU memory" in changes[1]["detail"]
    planned, _ = _run(data, tmp_path / "b", EngineOptions(
        recovery_plan_at=((3, "gradient_checkpointing"), (3, "cache_on_cpu"))), flip_aug=True)
    assert _same(recovered.tensors, planned.tensors)
    # the same images, flips and noise as a run that never ran out of memory (on the CPU the encoders'
    # outputs are the same cached or not; only the order of float sums in batched encoding may differ)
    plain, _ = _run(data, tmp_path / "c", flip_aug=True)
    for key in plain.tensors:
        torch.testing.assert_close(recovered.tensors[key], plain.tensors[key], rtol=1e-4, atol=1e-6)
    assert recovered.losses == pytest.approx(plain.losses, rel=1e-4)


def test_random_crop_keeps_latents_encoded_each_step_and_says_so(data, tmp_path):
    recovered, infos = _run(data, tmp_path / "a", EngineOptions(inject_oom_at=(2, 2)), random_crop=True)
    assert recovered.steps == 5
    change = json.loads(recovered.metadata["inplace_lora_recovery"])[-1]
    assert change["change"] == "cache_on_cpu"
    assert change["detail"].startswith("text conditioning cached in CPU memory, the text encoders no longer run")
    assert "not cached: latents: random_crop changes the pixels every step" in change["detail"]
    planned, _ = _run(data, tmp_path / "b", EngineOptions(
        recovery_plan_at=((2, "gradient_checkpointing"), (2, "cache_on_cpu"))), random_crop=True)
    assert _same(recovered.tensors, planned.tensors)


def test_nothing_to_cache_means_no_third_plan_and_the_error_says_why(data, tmp_path):
    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    with pytest.raises(UserError, match=r"every recovery plan tried \(gradient_checkpointing\)\. Not cached: "
                                        r"latents: random_crop and color_jitter change the pixels every step; "
                                        r"text conditioning: the text encoder is trained\."):
        _run(data, tmp_path, EngineOptions(inject_oom_at=(2, 2)), model=model, random_crop=True, color_jitter=0.5,
             train_text_encoder=True)
    assert model_fingerprint(model) == before


def test_a_run_that_caches_already_is_not_offered_the_plan(data, tmp_path):
    with pytest.raises(UserError, match=r"every recovery plan tried \(gradient_checkpointing\)\. Lower"):
        _run(data, tmp_path, EngineOptions(inject_oom_at=(2, 2)), cache_latents="auto",
             cache_text_encoder_outputs="auto")


def test_parking_takes_the_encoders_caching_turned_on_made_idle():
    """On a GPU the plan parks what the step no longer calls, besides what the run parked at its start
    (the CPU tests cannot move anything to a GPU; this checks which modules are parked)."""
    from types import SimpleNamespace

    from engine.encoder_parking import EncoderParking

    model = tiny_sd1(seed=3)
    data = SimpleNamespace(latent_cache_mode="memory", text_cache_enabled=False)  # latents cached from the start
    parking = EncoderParking.start(model, data, torch.device("cuda"), train_text_encoder=False)
    assert parking.modules == [model.vae] and parking.parked
    data.text_cache_enabled = True  # the plan cached the captions
    parking.follow(model, data, train_text_encoder=False)
    assert parking.modules == [model.vae, *model.text_encoders] and parking.parked
    parking.follow(model, data, train_text_encoder=False)  # nothing new: nothing twice
    assert len(parking.modules) == 1 + len(model.text_encoders)
