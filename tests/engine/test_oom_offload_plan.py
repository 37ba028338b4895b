"""The out-of-memory recovery's cpu_offload_checkpointing plan (engine/memory/recovery.py): a Flux run with
checkpointing on that runs out of memory keeps its batch and moves the checkpointed blocks' inputs to
CPU memory; it is recorded, kept by checkpoints and named by the memory advice. An SD model, whose
forward does not offload, goes to the halved batch as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import fast_step
from engine.errors import UserError
from engine.events import FunctionCallback
from engine.memory.advice import advise
from engine.memory.estimate import RunShape, estimate, weights_of_family
from engine.models import flux_forward, tiny_sd1
from engine.options import EngineOptions
from engine.train import train
from tests.engine.train_fixtures import pattern_dataset, quick_config

from test_flux_cli import _config, data, flux_files  # noqa: F401  (fixtures)

OFFLOADED = "checkpointed block inputs kept in CPU memory"


def _traced(monkeypatch):
    """A list that gets "offload" for each block that keeps its inputs in host memory, "fast" for each
    call of the CUDA-graph step's class, and ("step", n) / ("info", text) for the run's events."""
    trace = []
    real = flux_forward.offloaded_checkpoint
    monkeypatch.setattr(flux_forward, "offloaded_checkpoint", lambda *a: trace.append("offload") or real(*a))
    real_fast = fast_step.FastStep.step
    monkeypatch.setattr(fast_step.FastStep, "step", lambda self, batch: trace.append("fast") or real_fast(self, batch))

    def on_event(e):
        if e.kind in ("step", "info"):
            trace.append((e.kind, e.step if e.kind == "step" else e.message))
    return trace, FunctionCallback(on_event=on_event)


def _changes(result):
    return [(c["step"], c["change"]) for c in json.loads(result.metadata["inplace_lora_recovery"])]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flux_run_keeps_its_batch_and_offloads_the_block_inputs(flux_files, data, tmp_path, monkeypatch):
    trace, callback = _traced(monkeypatch)
    options = EngineOptions(inject_oom_at=(2,), fast_step_without_graph=True)  # a fast step to drop
    recovered = train(_config(flux_files, data, tmp_path / "a"), callbacks=[callback], options=options)
    assert recovered.steps == 3
    assert _changes(recovered) == [(2, "cpu_offload_checkpointing")]  # not the halved batch
    infos = [t[1] for t in trace if isinstance(t, tuple) and t[0] == "info"]
    assert f"out of memory at step 2: {OFFLOADED}; training step 2 again" in infos
    assert not any("micro-batch halved" in m for m in infos)
    change = trace.index(("info", f"out of memory at step 2: {OFFLOADED}; training step 2 again"))
    assert trace.index(("step", 1)) < change
    assert "offload" not in trace[:change] and "fast" in trace[:change]  # the graphed step ran step 1
    after = trace[change:]
    assert "fast" not in after  # dropped: steps 2 and 3 ran on the plain step, offloading
    assert after.index(("step", 2)) > after.index("offload") and "offload" in after[after.index(("step", 2)):]
    # the LoRA of a run that turned it on before step 2 (same seed)
    planned = train(_config(flux_files, data, tmp_path / "b"), options=EngineOptions(
        recovery_plan_at=((2, "cpu_offload_checkpointing"),), fast_step_without_graph=True))
    assert _same(recovered.tensors, planned.tensors) and recovered.losses == planned.losses


def test_a_resumed_flux_run_offloads_again_and_equals_the_uninterrupted_run(flux_files, data, tmp_path, monkeypatch):
    straight = train(_config(flux_files, data, tmp_path / "a", save_steps=2),
                     options=EngineOptions(inject_oom_at=(2,)))
    assert _changes(straight) == [(2, "cpu_offload_checkpointing")]
    name = "step-00000002"
    shutil.copytree(tmp_path / "a" / "flux" / "checkpoints" / name, tmp_path / "b" / "flux" / "checkpoints" / name)
    trace, callback = _traced(monkeypatch)
    resumed = train(_config(flux_files, data, tmp_path / "b", save_steps=2, resume_from_checkpoint="latest"),
                    callbacks=[callback])
    said = ("info", f"resumed with the out-of-memory recovery of step 2: {OFFLOADED}")
    assert said in trace and trace.index(said) < trace.index("offload") < trace.index(("step", 3))
    assert resumed.steps == 3 and _same(straight.tensors, resumed.tensors)
    assert _changes(resumed) == _changes(straight)


def test_the_last_error_names_the_plan_among_those_tried(flux_files, data, tmp_path):
    cfg = _config(flux_files, data, tmp_path, batch_size=1)
    with pytest.raises(UserError, match=r"at step 2, with every recovery plan tried \(cpu_offload_checkpointing"):
        train(cfg, options=EngineOptions(inject_oom_at=(2,) * 4))


def test_an_sd_model_never_offloads_and_goes_to_the_halved_batch(tmp_path, monkeypatch):
    data = pattern_dataset(tmp_path / "data")
    trace, callback = _traced(monkeypatch)
    result = train(quick_config(data, tmp_path / "out", max_train_steps=3, gradient_checkpointing=True),
                   tiny_sd1(seed=3), callbacks=[callback], options=EngineOptions(inject_oom_at=(2,)))
    assert _changes(result) == [(2, "half_micro_batch")]
    assert "offload" not in trace


def test_the_memory_advice_names_it_for_flux_with_checkpointing_on():
    weights = weights_of_family("flux1", precision="bf16", fp8_base=True)
    shape = RunShape(family="flux1", batch_size=4, latent_pixels=128 * 128, precision="bf16",
                     gradient_checkpointing=True)
    offloaded = estimate(shape.but(cpu_offload_checkpointing=True), weights).total
    full = estimate(shape, weights).total
    assert 5.0 < (full - offloaded) / 2**30 < 5.8  # bench/flux_step_memory.py predicts 5.3 GiB at batch 4
    advice = advise(shape, weights, free=int((offloaded + full) / 2 / 0.95))
    assert not advice.fits and advice.text.split(": ", 1)[1].startswith("turn on cpu_offload_checkpointing (about")
    sd = RunShape(family="sdxl", batch_size=4, latent_pixels=128 * 128, precision="bf16", gradient_checkpointing=True)
    sd_weights = weights_of_family("sdxl", precision="bf16")
    tight = advise(sd, sd_weights, free=int(estimate(sd, sd_weights).total * 0.9))
    assert "cpu_offload_checkpointing" not in tight.text


def _cuda_trainer(said, family="flux1", **cfg):
    """What the plan reads of a trainer on a CUDA device whose step the graph could run."""
    from types import SimpleNamespace

    from engine.config import TrainConfig
    from engine.families import FAMILIES

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    return SimpleNamespace(
        options=EngineOptions(), cfg=TrainConfig(gradient_checkpointing=True, **cfg), device=torch.device("cuda"),
        precision="bf16", optimizer=optimizer, dist=SimpleNamespace(enabled=False), frozen_te=False, fast=None,
        data=None,
        network=SimpleNamespace(text_encoder_parameters=lambda: []),
        model=SimpleNamespace(info=SimpleNamespace(spec=FAMILIES[family])),
        events=SimpleNamespace(emit=lambda kind, **k: said.append(k["message"])))


@pytest.mark.parametrize("graph", [True, False])
def test_the_log_line_says_the_steps_lose_their_cuda_graph_where_they_had_one(graph):
    from engine.memory.recovery import OFFLOAD, OutOfMemoryRecovery
    from engine.models.flux_offload import offloading

    said = []
    recovery = OutOfMemoryRecovery(_cuda_trainer(said, cuda_graph=graph))
    assert recovery._next() == OFFLOAD
    recovery._apply(OFFLOAD, 2, "out of memory at step 2")
    assert offloading() and recovery._next() != OFFLOAD
    recovery.close()
    assert not offloading()  # off again when the run ends
    expected = OFFLOADED + ("; steps run without the CUDA graph" if graph else "")
    assert said == [f"out of memory at step 2: {expected}; training step 2 again"]


def _fast_after(trace, text):
    """Whether the fast step ran again after the info line that starts with `text`."""
    said = next(i for i, t in enumerate(trace) if isinstance(t, tuple) and t[0] == "info" and t[1].startswith(text))
    return "fast" in trace[said:]


def test_a_flux_run_whose_recovery_offloads_takes_no_fast_step_again_even_after_caching(flux_files, data, tmp_path,
                                                                                       monkeypatch):
    """The offload drops the step's graph; the cache plan that follows sets the graphed step up again
    where it can, and must not here (the fast step without a graph stands in for the graph on the CPU)."""
    trace, callback = _traced(monkeypatch)
    options = EngineOptions(inject_oom_at=(2, 2), fast_step_without_graph=True)
    result = train(_config(flux_files, data, tmp_path, batch_size=1, cache_latents="off",
                           cache_text_encoder_outputs="off"), callbacks=[callback], options=options)
    assert _changes(result) == [(2, "cpu_offload_checkpointing"), (2, "cache_on_cpu")]
    assert "fast" in trace[:trace.index(("step", 1))]
    assert not _fast_after(trace, f"out of memory at step 2: {OFFLOADED}")
    assert result.steps == 3


@pytest.mark.parametrize("offload_in_config", [False, True])
def test_a_run_whose_recovery_only_turns_on_checkpointing_takes_the_fast_step_again(tmp_path, monkeypatch,
                                                                                   offload_in_config):
    """Checkpointing turned on by the recovery keeps the graph (captured again with checkpointing). An SD
    model's forward ignores cpu_offload_checkpointing, so the option in its config changes nothing.
    (The Flux adapter cannot turn checkpointing on mid-run; for it the decision is the next test's.)"""
    data = pattern_dataset(tmp_path / "data")
    trace, callback = _traced(monkeypatch)
    result = train(quick_config(data, tmp_path / "out", max_train_steps=3, cpu_offload_checkpointing=offload_in_config),
                   tiny_sd1(seed=3), callbacks=[callback],
                   options=EngineOptions(inject_oom_at=(2,), fast_step_without_graph=True))
    assert _changes(result) == [(2, "gradient_checkpointing")]
    assert _fast_after(trace, "out of memory at step 2: gradient checkpointing turned on")


@pytest.mark.parametrize("family, graphed", [("sdxl", True), ("flux1", False)])
def test_cpu_offload_checkpointing_costs_the_graph_only_where_the_forward_offloads(family, graphed):
    """kohya's option does nothing outside Flux.1 (its forward alone honours it): there the step stays
    graphed. The decision reads the run's switch and whether checkpointing is on now, so it is the same
    whether the config or the recovery turned either on."""
    from engine.models.flux_offload import offload_checkpointing, offloading

    trainer = _cuda_trainer([], family=family, cpu_offload_checkpointing=True)
    assert fast_step.graph_refusal(trainer, checkpointing=False, offloading=offloading()) is None
    with offload_checkpointing(True):  # what the run enters for the config's option, or the recovery's
        why = fast_step.graph_refusal(trainer, checkpointing=True, offloading=offloading())
    assert (why is None) is graphed
    assert graphed or why == "cpu_offload_checkpointing copies block inputs to host memory"
