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


def _cache_plan_encodes(monkeypatch, model, fail_above: int | None = None, captions: list | None = None) -> list[int]:
    """The batch sizes of the VAE calls the cache plan makes on `model`; with `fail_above`, a call of
    more images raises an out-of-memory error (what the SDXL VAE's attention did at 4 images, 1024 px);
    `captions` gets the sizes of its text-encoder calls."""
    import engine.memory.cache_plan as cache_plan

    sizes, inside = [], []
    apply, encode, encode_text = cache_plan.apply, model.encode_images, model.encode_text

    def spied_apply(*args, **kwargs):
        inside.append(True)
        try:
            return apply(*args, **kwargs)
        finally:
            inside.pop()

    def spied_encode(pixels):
        if inside:
            sizes.append(pixels.shape[0])
            if fail_above is not None and pixels.shape[0] > fail_above:
                raise torch.cuda.OutOfMemoryError(f"injected: {pixels.shape[0]} images in one VAE call")
        return encode(pixels)

    def spied_encode_text(texts):
        if inside:
            captions.append(len(texts))
        return encode_text(texts)

    monkeypatch.setattr(cache_plan, "apply", spied_apply)
    monkeypatch.setattr(model, "encode_images", spied_encode)
    if captions is not None:
        monkeypatch.setattr(model, "encode_text", spied_encode_text)
    return sizes


@pytest.mark.parametrize("options, chunk", [
    # batch 4 out of memory four times: checkpointing, 2 parts of 2, 4 parts of 1, then caching
    (EngineOptions(inject_oom_at=(2, 2, 2, 2)), 1),
    (EngineOptions(recovery_plan_at=((2, "half_micro_batch"), (2, "cache_on_cpu"))), 2),
])
def test_the_cache_plan_encodes_no_more_images_per_call_than_the_micro_batch(data, tmp_path, monkeypatch,
                                                                             options, chunk):
    model = tiny_sd1(seed=3)
    sizes = _cache_plan_encodes(monkeypatch, model)
    result, infos = _run(data, tmp_path, options, model=model, batch_size=4, flip_aug=True)  # vae_batch_size 4
    assert result.steps == 5
    assert sizes and max(sizes) == chunk and sum(sizes) == 2 * 4  # 4 images and their flips
    detail = json.loads(result.metadata["inplace_lora_recovery"])[-1]["detail"]
    per_call = f"encoded at most {chunk} image{'s' if chunk > 1 else ''} per VAE call"
    assert per_call in detail and any(per_call in m for m in infos)


def test_an_encode_out_of_memory_at_several_images_is_encoded_again_one_at_a_time(data, tmp_path, monkeypatch):
    """The injected recovery never reaches caching above a micro-batch of 1; a run resumed or planned at
    batch 4 does (chunks of 4): the VAE runs out of memory there, and each image goes alone."""
    plan = EngineOptions(recovery_plan_at=((2, "cache_on_cpu"),))
    model = tiny_sd1(seed=3)
    sizes = _cache_plan_encodes(monkeypatch, model, fail_above=1)
    recovered, _ = _run(data, tmp_path / "a", plan, model=model, batch_size=4)
    assert recovered.steps == 5 and sizes == [4, 1, 1, 1, 1]
    detail = json.loads(recovered.metadata["inplace_lora_recovery"])[-1]["detail"]
    assert "encoded at most 4 images per VAE call (out of memory at 4 per call: 1 call encoded again one at " \
           "a time)" in detail
    planned, _ = _run(data, tmp_path / "b", plan, batch_size=4)  # the same plan, no out-of-memory error
    for key in planned.tensors:  # the same latents, up to the order of float sums in batched encoding
        torch.testing.assert_close(recovered.tensors[key], planned.tensors[key], rtol=1e-4, atol=1e-6)


def test_a_cache_plan_out_of_memory_even_at_one_image_ends_with_the_clear_message(data, tmp_path, monkeypatch):
    from engine.events import FunctionCallback
    from engine.train import train
    from tests.engine.train_fixtures import quick_config

    model = tiny_sd1(seed=3)
    before = model_fingerprint(model)
    sizes = _cache_plan_encodes(monkeypatch, model, fail_above=0)
    events = []
    cfg = quick_config(data, tmp_path, max_train_steps=5, **UNCACHED)
    with pytest.raises(UserError, match=r"out of memory on cpu at step 3, with every recovery plan tried "
                                        r"\(gradient_checkpointing, cache_on_cpu, which itself ran out of memory\)\. "
                                        r"Lower the resolution.*resume from its last checkpoint"):
        train(cfg, model, callbacks=[FunctionCallback(on_event=events.append)],
              options=EngineOptions(inject_oom_at=(3, 3)))
    assert sizes == [1]  # one image, one call: nothing smaller to try
    assert model_fingerprint(model) == before
    error = [e for e in events if e.kind == "error"][-1]
    assert error.path and error.path.endswith("step-00000002")  # the last finished step is kept


def test_the_cache_plan_encodes_the_captions_together_whatever_the_micro_batch(data, tmp_path, monkeypatch):
    """Only the VAE's calls are cut to the micro-batch: the four captions go to the text encoders in one
    call, as a run that caches them from its start does, not in four calls of one."""
    model, captions = tiny_sd1(seed=3), []
    images = _cache_plan_encodes(monkeypatch, model, captions=captions)
    # batch 4 out of memory four times: checkpointing, 2 parts of 2, 4 parts of 1, then caching
    result, _ = _run(data, tmp_path, EngineOptions(inject_oom_at=(2, 2, 2, 2)), model=model, batch_size=4)
    assert result.steps == 5
    assert images == [1, 1, 1, 1] and captions == [4]
    detail = json.loads(result.metadata["inplace_lora_recovery"])[-1]["detail"]
    assert "encoded at most 1 image per VAE call" in detail
