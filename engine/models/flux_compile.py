"""`torch_compile: true` on Flux.1: each kind of block compiled once, not the whole loss.

Flux's step is compute-bound, but a block wraps its GEMMs and attention in many small elementwise ops
(the modulation, LayerNorm, the q/k RMSNorm, RoPE, GELU-tanh, the gated residual adds) that inductor
fuses into the kernels around them. Compiling the whole loss (engine/compiled_loss.py) traces all 57
blocks of Flux.1 into one graph, and on an H100 that compile had not finished after 150 s. Every double
block has the same shapes, as has every single block; so `double_block` and `single_block`
(flux_forward.py) are compiled here, once per bucket shape each, and the compiled code serves all 19 and
38 calls: Dynamo lifts a block's weights and its LoRA modules' weights into graph inputs instead of
baking them in, so the next block of the kind passes the same guards. The first double block gets a
second graph (its inputs need no gradient: nothing trained comes before it), hence `GRAPHS_PER_SHAPE`.

The LoRA forward hooks on a block's Linears, the fp8 weight casts (engine/models/fp8.py, ComfyUI's
casting Linears taken over by fp8_host.py) and the LoRA weight casts are traced into the graph as they
are into the whole-loss compile. Gradient checkpointing wraps the compiled block (non-reentrant: the
recomputation in backward replays the same compiled code), as the text mode wraps its compiled decoder
layers (engine/text/step.py); `flux_lean.lean_saves` is left out (inductor chooses what to keep). The
host's modules are traced, never changed. The CUDA-graph step captures the compiled kernels as it
captures plain ones; each shape compiles in its eager warm-up step, before any capture.

Only where gradients are taken: previews and validation (no grad) run the plain blocks. Only on the
devices `EngineOptions.compile_devices` names (CUDA: compiled_loss.py says why), and a block the
compiler cannot take trains as it is, with the reason logged.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

GRAPHS_PER_SHAPE = 2  # the double blocks' graphs per bucket shape: the first block's and the others'
_active: list[tuple | None] = [None]  # (double, single) compiled for the running run; None: plain


@contextlib.contextmanager
def compiled_blocks(on: bool, device: torch.device, say: Callable[[str], None], *, backend,
                    devices: tuple[str, ...]):
    """For the duration of a run: whether Flux's forward calls its blocks compiled (`on`, and `device` one
    of `devices`); says which."""
    from ..compiled_loss import MAX_GRAPHS, CompiledLoss, compiles_on
    from . import flux_forward

    blocks = None
    if on and compiles_on(device, say, devices):
        say(f"torch_compile: Flux.1's double and single blocks are compiled, each kind once per bucket shape at "
            f"its first step, for up to {MAX_GRAPHS} shapes (not the whole step)")
        blocks = tuple(CompiledLoss(fn, say, f"Flux's {kind} blocks", backend=backend, graphs_per_shape=GRAPHS_PER_SHAPE)
                       for fn, kind in ((flux_forward.double_block, "double"), (flux_forward.single_block, "single")))
    _active.append(blocks)
    try:
        yield
    finally:
        _active.pop()
        for block in blocks or ():
            block.release()  # the run's graphs go with it (compiled_loss.py says why)


def compiled_pair() -> tuple | None:
    """(double, single) compiled block functions for a forward that takes gradients in a compiled run, else None."""
    return _active[-1] if torch.is_grad_enabled() else None
