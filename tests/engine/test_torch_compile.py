"""`torch_compile: true`: the compiled step trains as the plain step does, and a run that cannot
compile still trains and says why.

The CPU cannot run inductor's kernels here (torch 2.13's CPU inductor returns wrong gradients for SD
UNets, which is why the option is CUDA-only; `python -m bench.compile_check` checks a GPU's kernels).
These tests compile with the `aot_eager` backend instead: the same Dynamo trace of the loss, the LoRA
hooks and the UNet, and the same forward/backward split by AOTAutograd, run by eager kernels. So they
check that compiling changes nothing but kernels: losses and final weights to 1e-5 relative.
"""

import dataclasses

import pytest
import torch
from torch._dynamo.exc import Unsupported

import engine.compiled_loss as compiled_loss
from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.options import EngineOptions
from engine.step import TrainingStep
from engine.train import train

from compile_probe import GraphCounter
from train_fixtures import pattern_dataset, quick_config

OPTS = dict(max_train_steps=5, batch_size=2, lr_scheduler="cosine", warmup_steps=2, max_grad_norm=0.05)
RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("compile"), n=4)


# the fast step and the compiled loss on the CPU (aot_eager kernels)
COMPILES_ON_CPU = EngineOptions(fast_step_without_graph=True, compile_backend="aot_eager",
                                compile_devices=("cuda", "cpu"))


def _run(data, out, options=None, **opts):
    events = []
    result = train(quick_config(data, out, **{**OPTS, **opts}), tiny_sd1(), callbacks=[FunctionCallback(events.append)],
                   options=options)
    said = [e.message for e in events if e.kind == "info" and e.message and "torch_compile" in e.message]
    return result, said


def test_compiled_step_gives_the_plain_loss_curve(data, tmp_path):
    plain, _ = _run(data, tmp_path / "plain")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, said = _run(data, tmp_path / "compiled", COMPILES_ON_CPU, torch_compile=True)
    assert compiled.fast_steps == 5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert said == []
    assert len(plain.losses) == len(compiled.losses) == 5
    for a, b in zip(plain.losses, compiled.losses):
        assert abs(a - b) <= RTOL * abs(a), (plain.losses, compiled.losses)
    assert plain.tensors.keys() == compiled.tensors.keys()
    for key, value in plain.tensors.items():
        assert torch.allclose(value, compiled.tensors[key], rtol=RTOL, atol=1e-7), key
    assert any(v.abs().sum() > 0 for k, v in compiled.tensors.items() if k.endswith("lora_up.weight"))


def test_a_step_that_cannot_compile_trains_without_it(data, tmp_path, monkeypatch):
    """The user sees why in the run's log, and the run is the plain one."""
    def refuse(fn, **kw):
        def compiled(*args):
            raise Unsupported("a construct the compiler cannot trace")
        return compiled

    monkeypatch.setattr(compiled_loss.torch, "compile", refuse)
    plain, _ = _run(data, tmp_path / "plain", COMPILES_ON_CPU)
    fallback, said = _run(data, tmp_path / "fallback", COMPILES_ON_CPU, torch_compile=True)
    assert len(said) == 1 and "a construct the compiler cannot trace" in said[0] and "without it" in said[0]
    assert plain.losses == fallback.losses


def test_on_the_cpu_it_says_cuda_only_and_trains_plain(data, tmp_path):
    plain, _ = _run(data, tmp_path / "plain")
    cpu, said = _run(data, tmp_path / "cpu", torch_compile=True)
    assert len(said) == 1 and "CUDA only" in said[0]
    assert plain.losses == cpu.losses


def test_each_run_in_one_process_compiles_its_own_step(data, tmp_path, monkeypatch):
    """A host (ComfyUI, the WebUI) trains many runs in one process. Dynamo keeps compiled graphs on the
    code object of the function it compiles, one object for every run; were runs to share it, graphs of
    earlier runs would count against the limit of the later ones, which would then train uncompiled with a
    warning in the console only. With the limit at one graph per shape (as if a run had filled all
    MAX_GRAPHS), a second run with another rank (so another graph) still compiles its step; each run's
    graphs are freed when it ends; the host's own compiled function keeps its graph."""
    monkeypatch.setattr(compiled_loss, "MAX_GRAPHS", 1)
    host = GraphCounter()
    host_fn = torch.compile(lambda x: x.sin() * 2, backend=host)
    host_fn(torch.ones(3))
    for rank in (4, 8):
        counter = GraphCounter()
        options = dataclasses.replace(COMPILES_ON_CPU, compile_backend=counter)
        torch._dynamo.utils.counters.clear()
        result, said = _run(data, tmp_path / f"rank{rank}", options, torch_compile=True, lora_rank=rank)
        assert result.steps == 5 and said == []
        # after a graph break Dynamo would compile the frames below as their own, on code objects all runs share
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        assert counter.compiled >= 1, f"the rank-{rank} run trained uncompiled"
        assert counter.alive() == 0, "the run's compiled graphs outlive it"
    assert torch._C._dynamo.eval_frame._debug_get_cache_entry_list(TrainingStep.plain_loss.__code__) == []
    host_fn(torch.ones(3))
    assert host.compiled == 1 and host.alive() == 1, "the host's compiled function lost its graph"


def test_shapes_beyond_the_limit_train_uncompiled_and_the_user_hears_it():
    """A run with more input shapes (bucket and batch sizes) than MAX_GRAPHS compiles the first MAX_GRAPHS
    and says, once, that the others train uncompiled; their results are the plain function's."""
    said, counter = [], GraphCounter()
    loss = compiled_loss.CompiledLoss(lambda x: (x * 2).square().mean(), said.append, "the step", backend=counter)
    shapes = compiled_loss.MAX_GRAPHS + 3
    for side in range(1, shapes + 1):
        assert float(loss(torch.ones(side, side + 1))) == 4.0
    assert float(loss(torch.ones(1, 2))) == 4.0  # a compiled shape again
    assert counter.compiled == compiled_loss.MAX_GRAPHS
    assert len(said) == 1 and f"more than {compiled_loss.MAX_GRAPHS} input shapes" in said[0], said
    assert f"beyond the first {compiled_loss.MAX_GRAPHS} run the step uncompiled" in said[0]
    loss.release()
    assert counter.alive() == 0


def test_a_setting_that_changes_mid_run_past_the_limit_is_said_and_the_compiled_calls_stay(monkeypatch):
    """One input shape, but something the graphs are guarded on changes during the run (here a module
    attribute, as checkpointing turned on by the out-of-memory recovery is): each change compiles another
    graph. Past the run's limit, torch would run the new calls uncompiled with only a console warning; the
    user hears it once, every call still gives the plain function's result, and the calls that match a
    graph already compiled stay compiled."""
    monkeypatch.setattr(compiled_loss, "MAX_GRAPHS", 2)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = 1

        def forward(self, x):
            return (x * self.factor).sum()

    module, said, counter = Scaled(), [], GraphCounter()
    loss = compiled_loss.CompiledLoss(module.forward, said.append, "the step", backend=counter)
    x = torch.ones(2, 3)
    for factor in (1, 2, 3, 4, 1, 2):
        module.factor = factor
        assert float(loss(x)) == 6.0 * factor
    assert counter.compiled == 2 and loss.failed is None
    assert len(said) == 1 and "needed more than the 2 graphs one run compiles" in said[0], said
    assert "calls that need a new graph run the step uncompiled" in said[0]
    loss.release()
    assert counter.alive() == 0


def test_a_run_with_more_shapes_than_the_limit_says_so(data, tmp_path, monkeypatch):
    """Four images in batches of three: two input shapes (3 and 1 images). With the limit at one shape, the
    first is compiled and the user reads that the other trains uncompiled."""
    monkeypatch.setattr(compiled_loss, "MAX_GRAPHS", 1)
    counter = GraphCounter()
    result, said = _run(data, tmp_path / "shapes", dataclasses.replace(COMPILES_ON_CPU, compile_backend=counter),
                        torch_compile=True, batch_size=3)
    assert result.steps == 5 and counter.compiled == 1
    assert len(said) == 1 and "more than 1 input shapes" in said[0] and "run the step uncompiled" in said[0], said


def test_every_bucket_shape_is_compiled_past_torchs_default_limit(monkeypatch):
    """torch stops compiling a function after 8 input shapes; a run with more buckets keeps compiling
    (up to the 16 shapes the fast step graphs), and the host's own limit is left as it was."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit = torch._dynamo.config.recompile_limit
    loss = compiled_loss.CompiledLoss(lambda x: (x * 2).square().mean(), backend="aot_eager")
    for side in range(1, 13):
        assert float(loss(torch.ones(side, side + 1))) == 4.0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 12
    assert loss.failed is None
    assert torch._dynamo.config.recompile_limit == limit


def test_a_backward_that_cannot_compile_falls_back_too(data, tmp_path):
    """torch compiles the backward lazily, at the first backward; a failure there would end the run. The
    engine compiles it with the forward, so it is caught like a forward failure."""
    from torch._dynamo.backends.common import aot_autograd

    def refuse_backward(gm, example_inputs):
        raise RuntimeError("no kernel for this backward")

    options = dataclasses.replace(COMPILES_ON_CPU, compile_backend=aot_autograd(fw_compiler=lambda gm, _: gm,
                                                                                bw_compiler=refuse_backward))
    torch._dynamo.reset()
    plain, _ = _run(data, tmp_path / "plain", COMPILES_ON_CPU)
    fallback, said = _run(data, tmp_path / "fallback", options, torch_compile=True)
    assert len(said) == 1 and "no kernel for this backward" in said[0], said
    assert plain.losses == fallback.losses
