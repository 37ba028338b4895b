"""`torch_compile: true` on Flux.1 compiles its double and single blocks, each kind once, not the whole
loss (57 blocks in one graph took minutes on a GPU), and trains as the plain run does.

As in test_torch_compile.py the CPU compiles with the `aot_eager` backend: Dynamo's trace of the block
with its LoRA hooks and fp8 weight casts and AOTAutograd's forward/backward split, run by eager kernels.
So these tests check that compiling per block changes nothing but kernels, with and without gradient
checkpointing and with fp8 weights: the same losses and LoRA weights (1e-5 relative), the host's
transformer bit-identical, and one graph serving every block of a kind.
"""

import dataclasses
import hashlib

import pytest
import torch
from torch._dynamo.exc import Unsupported

import engine.compiled_loss as compiled_loss
from engine.events import FunctionCallback
from engine.models.flux_adapter import load_flux
from engine.models.fp8 import store_in_fp8
from engine.options import EngineOptions
from engine.train import train

from compile_probe import GraphCounter
from test_flux_cli import DIMS, _config, data, flux_files  # noqa: F401  (fixtures)

RTOL = 1e-5
# the CUDA-graph step's body on the CPU, without and with the compiled blocks (aot_eager kernels)
FAST_STEP = EngineOptions(fast_step_without_graph=True)
COMPILES_ON_CPU = EngineOptions(fast_step_without_graph=True, compile_backend="aot_eager",
                                compile_devices=("cuda", "cpu"))


def _model(files, cfg, fp8: bool):
    """The run's Flux as a host would hand it over (fp8: its Linear weights stored in float8, as fp8_base)."""
    model = load_flux(cfg, files / "flux1-micro.safetensors", device="cpu", dtype=torch.bfloat16)
    if fp8:
        store_in_fp8(model.transformer)
    return model


def _digest(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(files, data, out, *, fp8=False, options=None, **changes):
    cfg = _config(files, data, out, **{"mixed_precision": "bf16", "max_train_steps": 3, **changes})
    model = _model(files, cfg, fp8)
    before = _digest(model.transformer)
    events = []
    result = train(cfg, model, callbacks=[FunctionCallback(events.append)], options=options)
    said = [e.message for e in events if e.kind == "info" and e.message and "torch_compile" in e.message]
    return result, said, before == _digest(model.transformer)


@pytest.mark.parametrize("checkpointing,fp8", [(False, False), (True, False), (True, True)],
                         ids=["plain", "checkpointing", "fp8-checkpointing"])
def test_compiled_blocks_train_as_the_plain_blocks(flux_files, data, tmp_path, checkpointing, fp8):
    plain, _, _ = _run(flux_files, data, tmp_path / "plain", fp8=fp8, options=FAST_STEP,
                       gradient_checkpointing=checkpointing)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, said, unchanged = _run(flux_files, data, tmp_path / "compiled", fp8=fp8, options=COMPILES_ON_CPU,
                                     gradient_checkpointing=checkpointing, torch_compile=True)
    assert len(said) == 1 and "double and single blocks are compiled" in said[0], said
    assert compiled.fast_steps == 3
    # one bucket shape: the first double block's graph, the other double blocks', the single blocks'
    # (DIMS has 2 of each; Flux.1's 19 and 38 share them the same way)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    assert unchanged, "the host's transformer changed"
    assert len(plain.losses) == len(compiled.losses) == 3
    for a, b in zip(plain.losses, compiled.losses):
        assert abs(a - b) <= RTOL * abs(a), (plain.losses, compiled.losses)
    assert plain.tensors.keys() == compiled.tensors.keys()
    for key, value in plain.tensors.items():
        torch.testing.assert_close(compiled.tensors[key].float(), value.float(), rtol=RTOL, atol=1e-7, msg=key)
    assert any(v.abs().sum() > 0 for k, v in compiled.tensors.items() if k.endswith("lora_up.weight"))


def test_each_run_in_one_process_compiles_its_own_blocks(flux_files, data, tmp_path, monkeypatch):
    """The blocks are module-level functions, one code object for every run of a host's process, where
    Dynamo keeps its graphs. With the limit at one shape's graphs (as if a run had filled all MAX_GRAPHS),
    a second run with another rank, then a third in fp8, still compile all three graphs; each run's graphs
    are freed when it ends."""
    from engine.models import flux_forward

    monkeypatch.setattr(compiled_loss, "MAX_GRAPHS", 1)
    for rank, fp8 in ((4, False), (8, False), (8, True)):
        counter = GraphCounter()
        options = dataclasses.replace(COMPILES_ON_CPU, compile_backend=counter)
        result, said, _ = _run(flux_files, data, tmp_path / f"rank{rank}-{fp8}", fp8=fp8, options=options,
                               torch_compile=True, lora_rank=rank)
        assert result.fast_steps == 3 and len(said) == 1, said
        # the first double block's graph, the other double blocks', the single blocks'
        assert counter.compiled == 3, f"rank {rank}, fp8 {fp8}: {counter.compiled} of the 3 block graphs compiled"
        assert counter.alive() == 0, "the run's compiled graphs outlive it"
    for fn in (flux_forward.double_block, flux_forward.single_block):
        assert torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__) == []


def test_blocks_that_cannot_compile_train_without_it(flux_files, data, tmp_path, monkeypatch):
    """The user sees why, once per block kind, and the run is the plain one."""
    def refuse(fn, **kw):
        def compiled(*args):
            raise Unsupported("a construct the compiler cannot trace")
        return compiled

    monkeypatch.setattr(compiled_loss.torch, "compile", refuse)
    plain, _, _ = _run(flux_files, data, tmp_path / "plain", options=FAST_STEP)
    fallback, said, _ = _run(flux_files, data, tmp_path / "fallback", options=COMPILES_ON_CPU, torch_compile=True)
    failures = said[1:]
    assert [("double" in m, "single" in m) for m in failures] == [(True, False), (False, True)], said
    assert all("a construct the compiler cannot trace" in m and "without it" in m for m in failures)
    assert plain.losses == fallback.losses


def test_on_the_cpu_it_says_cuda_only_and_trains_plain(flux_files, data, tmp_path):
    plain, _, _ = _run(flux_files, data, tmp_path / "plain")
    cpu, said, _ = _run(flux_files, data, tmp_path / "cpu", torch_compile=True)
    assert len(said) == 1 and "CUDA only" in said[0], said
    assert plain.losses == cpu.losses
