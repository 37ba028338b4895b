"""The memory estimate: the measured H100 peaks it was fitted to, the advice text, a loaded model."""

from __future__ import annotations

import pytest
import torch

from engine.memory import RunShape, advise, estimate, weights_of_family, weights_of_model

GiB = 1 << 30
# bench/RESULTS.md, `ours` (bf16, rank 16, AdamW, cached latents and text), H100: (model, batch, ckpt) -> GiB
MEASURED = {("sd1", 1, False): 2.58, ("sd1", 4, False): 4.98, ("sd1", 8, False): 8.20,
            ("sd1", 1, True): 1.93, ("sd1", 4, True): 2.43, ("sd1", 8, True): 3.09,
            ("sdxl", 1, False): 11.04, ("sdxl", 4, False): 27.74, ("sdxl", 8, False): 50.02,
            ("sdxl", 1, True): 6.04, ("sdxl", 4, True): 7.87, ("sdxl", 8, True): 10.31}
LATENT = {"sd1": 64 * 64, "sdxl": 128 * 128}


def _shape(family, batch, ckpt, **kw):
    return RunShape(family=family, batch_size=batch, latent_pixels=LATENT[family], precision="bf16",
                    gradient_checkpointing=ckpt, **kw)


@pytest.mark.parametrize("key", sorted(MEASURED))
def test_estimate_matches_the_measured_peaks(key):
    family, batch, ckpt = key
    est = estimate(_shape(family, batch, ckpt), weights_of_family(family, precision="bf16"))
    measured = MEASURED[key] * GiB
    assert -0.05 <= est.total / measured - 1 <= 0.10, (key, est.breakdown(), MEASURED[key])


def test_fp8_base_and_uncached_rows():
    # fp8_base measured by bench/memory_estimate.py on an H100 (2026-12-07, fp8 layers keeping their fp8 weight
    # for backward): batch 1 with checkpointing SD1.5 1.12, SDXL 3.61 GiB; batch 4 without 3.92, 24.46 GiB. And
    # the uncached rows at batch 4 without checkpointing (5.30, 28.06 GiB)
    for family, batch, ckpt, measured in (("sd1", 1, True, 1.12), ("sdxl", 1, True, 3.61),
                                          ("sd1", 4, False, 3.92), ("sdxl", 4, False, 24.46)):
        est = estimate(_shape(family, batch, ckpt), weights_of_family(family, precision="bf16", fp8_base=True))
        assert -0.05 <= est.total / (measured * GiB) - 1 <= 0.10, (family, batch, est.breakdown())
    for family, measured in (("sd1", 5.30), ("sdxl", 28.06)):
        est = estimate(_shape(family, 4, False, cache_latents=False), weights_of_family(family, precision="bf16"))
        assert -0.05 <= est.total / (measured * GiB) - 1 <= 0.10, (family, est.breakdown())


def test_uncached_rows_with_checkpointing_count_the_vae_encoding():
    # bench/memory_estimate.py on an H200 (2026-12-07), batch 4, latents encoded every step, checkpointing on:
    # the VAE's encoding is the larger transient (SD1.5 4.10 GiB, SDXL 13.84 GiB; 1024 bytes a pixel
    # estimated 3.08 and 9.79, 25-29% under)
    for family, measured in (("sd1", 4.10), ("sdxl", 13.84)):
        est = estimate(_shape(family, 4, True, cache_latents=False), weights_of_family(family, precision="bf16"))
        assert -0.05 <= est.total / (measured * GiB) - 1 <= 0.10, (family, est.breakdown())
        assert "vae_encode" in est.parts


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fp8_base_is_the_bf16_peak_less_the_weight_bytes_it_saves(family, ckpt):
    # fp8 layers keep their fp8 weight for backward, not a bf16 copy: fp8_base saves memory with
    # checkpointing off too (before, its estimate and its peak were above bf16's there)
    shape = _shape(family, 4, ckpt)
    bf16, fp8 = weights_of_family(family, precision="bf16"), weights_of_family(family, precision="bf16", fp8_base=True)
    plain, small = estimate(shape, bf16), estimate(shape, fp8)
    saved = bf16.denoiser - fp8.denoiser
    assert saved > 0.4 * bf16.denoiser
    assert small.parts["activations"] == plain.parts["activations"]
    assert 0 < small.total - (plain.total - saved) <= 256 << 20  # one layer's cast at a time
    assert small.total < plain.total - 0.35 * bf16.denoiser


def test_advice_names_the_settings_that_fit():
    weights = weights_of_family("sdxl", precision="bf16")
    shape = _shape("sdxl", 4, False)
    advice = advise(shape, weights, 12 * GiB, device_name="this GPU")
    assert not advice.fits
    assert advice.text.startswith("needs about 27.8 GiB at batch 4; this GPU has 12.0 GiB free: ")
    assert "free: turn on gradient checkpointing (about 7.9 GiB) or use batch 1 with gradient_accumulation_steps x4 (about 11.1 GiB)" in advice.text
    assert advice.fix.gradient_checkpointing and advice.fix.batch_size == 4
    roomy = advise(shape, weights, 40 * GiB)
    assert roomy.fits and "fits (model 4.8, LoRA + optimizer 0.7, activations 22.3" in roomy.text
    # nothing fits: says what else to do
    assert "will not fit even at batch 1" in advise(shape, weights, 4 * GiB).text


def test_batch_halving_is_offered_when_checkpointing_is_on():
    weights = weights_of_family("sdxl", precision="bf16")
    advice = advise(_shape("sdxl", 8, True), weights, 9 * GiB)
    assert not advice.fits and advice.fix.batch_size == 4
    assert "use batch 4 with gradient_accumulation_steps x2" in advice.text


def test_unknown_family_has_no_estimate():
    assert estimate(RunShape(family="nope", batch_size=1, latent_pixels=4096, precision="bf16"),
                    weights_of_family("sd1", precision="bf16")) is None
    assert weights_of_family("nope", precision="bf16") is None


def test_loaded_model_is_counted_from_its_modules():
    from engine.models import tiny_sd1

    model = tiny_sd1(seed=3)
    w = weights_of_model(model, on_device_only=False)
    unet = model.trainable_roots()[0]
    assert w.denoiser == sum(p.numel() * p.element_size() for p in [*unet.parameters(), *unet.buffers()])
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
                break
    assert weights_of_model(model, on_device_only=False).fp8 > 0


def test_engine_check_shows_the_estimate_and_the_fix(tmp_path, monkeypatch, capsys):
    """`python -m engine check --config x.yaml` with an SDXL base_model and a 12 GiB card."""
    import engine.memory.run as memory_run
    import engine.models.detect as detect
    from engine.check import check_main
    from tests.engine.train_fixtures import pattern_dataset

    data = pattern_dataset(tmp_path / "data", n=4)
    model = tmp_path / "sdxl.safetensors"
    model.write_bytes(b"not read: detection is monkeypatched")
    monkeypatch.setattr(detect, "detect_path", lambda path: detect.Detection(family="sdxl", description="SDXL"))
    monkeypatch.setattr(memory_run, "free_memory", lambda device: 12 * GiB)
    config = tmp_path / "x.yaml"
    config.write_text(f"train_data_dir: {data}\nbase_model: {model}\nresolution: 1024\nbatch_size: 4\n"
                      f"mixed_precision: bf16\n", encoding="utf-8")
    assert check_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("Memory: needs about 27.8 GiB at batch 4; cpu has 12.0 GiB free: turn on gradient checkpointing "
            "(about 7.9 GiB)") in out


def test_trainer_start_message_carries_the_estimate(tmp_path, monkeypatch):
    import engine.memory.run as memory_run
    from engine.events import FunctionCallback
    from engine.models import tiny_sd1
    from engine.train import train
    from tests.engine.train_fixtures import pattern_dataset, quick_config

    monkeypatch.setattr(memory_run, "free_memory", lambda device: 1 * GiB)
    starts = []
    cfg = quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=1)
    train(cfg, tiny_sd1(seed=3), callbacks=[FunctionCallback(lambda e: starts.append(e.message) if e.kind == "start"
                                                             else None)])
    assert "; memory: needs about " in starts[0] and "at batch 2; cpu has 1.0 GiB free" in starts[0]


def test_flux_rows_measured_on_an_h100():
    # bench.run flux1 (H100, 2026-12-07, 1024 px, batch 1, cached, the lean forward): bf16 44.50 / 25.36 GiB
    # without / with checkpointing, fp8_base 33.11 / 14.28; batch 4 with checkpointing 32.95 (H200, before the
    # lean forward, which only lowers it)
    for fp8, ckpt, batch, measured in ((False, False, 1, 44.50), (False, True, 1, 25.36), (True, False, 1, 33.11),
                                       (True, True, 1, 14.28), (False, True, 4, 32.95)):
        shape = RunShape(family="flux1", batch_size=batch, latent_pixels=128 * 128, precision="bf16",
                         gradient_checkpointing=ckpt)
        est = estimate(shape, weights_of_family("flux1", precision="bf16", fp8_base=fp8))
        assert -0.05 <= est.total / (measured * GiB) - 1 <= 0.10, (fp8, ckpt, batch, est.breakdown())


def test_fp8_compute_counts_its_fp8_copy_of_the_linear_weights():
    # bench.run flux1 on one H100 (engine d970486, 1024 px, batch 1, cached): ours-fp8c 55.54 / 36.46 GiB without /
    # with checkpointing (bf16: 44.50 / 25.36, 11.04-11.10 GiB less); ours-fp8c-fp8 on fp8_base 33.31 / 14.29 (its
    # layers multiply the stored fp8 weights: no copy)
    for fp8_base, ckpt, measured in ((False, False, 55.54), (False, True, 36.46), (True, False, 33.31),
                                     (True, True, 14.29)):
        shape = RunShape(family="flux1", batch_size=1, latent_pixels=128 * 128, precision="bf16",
                         gradient_checkpointing=ckpt, fp8_compute=True)
        weights = weights_of_family("flux1", precision="bf16", fp8_base=fp8_base)
        est = estimate(shape, weights)
        assert -0.05 <= est.total / (measured * GiB) - 1 <= 0.10, (fp8_base, ckpt, est.breakdown())
        copy = 0 if fp8_base else 11_898_322_944  # Flux.1-dev's 314 Linear weights, 1 byte each
        assert est.parts["fp8_copy"] == copy
        assert est.total - estimate(shape.but(fp8_compute=False), weights).total == copy


def test_a_loaded_models_fp8_copy_is_its_linear_weights_not_in_fp8():
    from engine.models import tiny_sd1

    model = tiny_sd1(seed=3)
    unet = model.trainable_roots()[0]
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)
               and not m.weight.shape[0] % 16 and not m.weight.shape[1] % 16]
    assert linears
    assert weights_of_model(model, on_device_only=False).fp8_copy == sum(m.weight.numel() for m in linears)
    with torch.no_grad():  # a layer stored in fp8 (fp8_base, ComfyUI's fp8 weights) is used as it is
        linears[0].weight.data = linears[0].weight.data.to(torch.float8_e4m3fn)
    assert weights_of_model(model, on_device_only=False).fp8_copy == sum(m.weight.numel() for m in linears[1:])


def test_the_start_message_counts_fp8_computes_copy_as_loaded_already(tmp_path, monkeypatch):
    """fp8_compute makes its copy before the start message: free memory is already less by it, so the
    estimate's copy is part of what is loaded, not counted against free memory a second time."""
    import engine.memory.run as memory_run
    import engine.models.fp8_compute as fc
    from engine.models import tiny_sd1
    from engine.train import train
    from tests.engine.train_fixtures import pattern_dataset, quick_config

    monkeypatch.setattr(fc, "ALLOW_CPU", True)
    monkeypatch.setattr(memory_run, "free_memory", lambda device: 1 * GiB)
    seen = []
    original = memory_run.advise

    def spy(shape, weights, free, *, already=0, **kw):
        seen.append((shape, weights, already))
        return original(shape, weights, free, already=already, **kw)

    monkeypatch.setattr(memory_run, "advise", spy)
    model = tiny_sd1(seed=3)
    cfg = quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=1, fp8_compute=True,
                       mixed_precision="bf16")
    train(cfg, model)
    shape, weights, already = seen[0]
    assert shape.fp8_compute and weights.fp8_copy > 0
    assert already == weights.denoiser + weights.fp8_copy  # latents and text cached: the encoders parked
