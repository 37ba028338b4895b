"""The step the CUDA graph replays trains a Flux.1 LoRA bit for bit like the plain step (on the CPU,
where it runs without the graph): the same losses and the same LoRA tensors after three steps. The
graph path is where the speed comes from; this is what lets the other Flux tests compare against it."""

import torch

from test_flux_cli import data, flux_files  # noqa: F401  (fixtures)
from test_flux_compile import FAST_STEP, _run


def test_graph_body_trains_flux_as_the_plain_step(flux_files, data, tmp_path):
    plain, _, _ = _run(flux_files, data, tmp_path / "plain", options=None)
    fast, _, _ = _run(flux_files, data, tmp_path / "fast", options=FAST_STEP)
    assert plain.fast_steps == 0 and fast.fast_steps == 3
    assert plain.losses == fast.losses
    assert plain.tensors.keys() == fast.tensors.keys()
    different = [k for k in plain.tensors if not torch.equal(plain.tensors[k], fast.tensors[k])]
    assert not different, different[:5]
