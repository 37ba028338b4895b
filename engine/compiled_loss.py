"""The diffusion loss compiled by torch.compile (inductor), for `torch_compile: true`.

A third of an SD1.5 step's GPU time is small elementwise kernels (GroupNorm + SiLU, residual adds,
GEGLU, LoRA adds, casts) and another tenth is cuDNN reordering NCHW activations for its convolutions
(bench/kernel_breakdown.py). Inductor fuses the elementwise chains into the kernels around them, in
the forward and the backward it derives (on an H100, the kernel time outside matmuls, convolutions,
attention and norms fell from 28.8 to 7.7 ms per SD1.5 batch-8 step; the cuDNN reordering stays).
The CUDA graph then replays the compiled kernels as it replays the plain ones.

What is compiled is the training step's `loss` (engine/step.py: objective, denoiser and loss over the
step's tensor dict), once per input shape (one per bucket), at that shape's first step: minutes for
an SDXL UNet, so it pays off on long runs. A model torch.compile cannot trace is trained as it is, with
the reason logged; the host's modules are traced, never changed.

CUDA only (`EngineOptions.compile_devices`; the tests compile on the CPU with the aot_eager backend): torch 2.13's CPU inductor returns wrong LoRA gradients through diffusers' ResnetBlock2D +
Upsample2D (`python -m bench.compile_check tiny` on a CPU: gradient cosines near 0), while the loss
itself looks right, so a CPU run would silently train badly. `bench.compile_check` checks a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from .fast_step import MAX_GRAPHS
from .options import EngineOptions

logger = logging.getLogger(__name__)

# EngineOptions' defaults: image runs pass the options' values, the text mode reads these
BACKEND = EngineOptions.compile_backend
DEVICES = EngineOptions.compile_devices


def loss_for_run(loss: Callable[..., torch.Tensor], device: torch.device, say: Callable[[str], None], *,
                 backend: str | None = None, devices: tuple[str, ...] | None = None) -> Callable[..., torch.Tensor]:
    """The loss a `torch_compile: true` run trains with: compiled on CUDA, the plain one elsewhere."""
    if not compiles_on(device, say, devices):
        return loss
    return CompiledLoss(loss, lambda why: say(f"torch_compile: could not compile the step ({why}); "
                                              f"training without it"), backend=backend)


def compiles_on(device: torch.device, say: Callable[[str], None], devices: tuple[str, ...] | None = None) -> bool:
    """Whether `torch_compile: true` compiles on `device`; where it does not, says so."""
    if device.type in (devices or DEVICES):
        return True
    say(f"torch_compile: runs on CUDA only (on {device.type}, torch's inductor can return wrong "
        f"gradients); training without it")
    return False


class CompiledLoss:
    """Call the compiled function (a loss, a layer, a block); on a compile failure, say why once and call
    the plain one from then on. `graphs_per_shape`: how many graphs one input shape may need (a block
    called with and without inputs that need gradients compiles twice)."""

    def __init__(self, loss: Callable[..., torch.Tensor], on_fallback: Callable[[str], None] | None = None,
                 backend: str | None = None, graphs_per_shape: int = 1):
        self.plain = loss
        self.compiled = torch.compile(loss, dynamic=False, backend=backend or BACKEND)
        self.on_fallback = on_fallback
        self.graphs_per_shape = graphs_per_shape
        self.failed: str | None = None

    def __call__(self, *args) -> torch.Tensor:
        if self.failed is None:
            try:
                with _compile_settings(MAX_GRAPHS * self.graphs_per_shape):
                    return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or code generation, not the run
                self.failed = _reason(exc)
                logger.warning("torch.compile could not compile %s (%s); training without it",
                               getattr(self.plain, "__name__", "the training step"), self.failed)
                if self.on_fallback is not None:
                    self.on_fallback(self.failed)
        return self.plain(*args)


def _compile_settings(graphs: int = MAX_GRAPHS):
    """Set only around our call, so the host's settings stay: `graphs` compiled graphs (one per bucket
    shape, as many as the CUDA graphs: torch's default stops at 8 and runs later shapes uncompiled); and the backward
    compiled with the forward (torch defers it to the first backward, where a failure would end the
    run instead of falling back here)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=graphs))
    functorch_config = torch._functorch.config
    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        stack.enter_context(functorch_config.patch(force_non_lazy_backward_lowering=True))
    return stack


def _reason(exc: Exception) -> str:
    """One line: the wrapper's name and the first line of what went wrong inside it (a backend
    failure wraps the compiler's own exception)."""
    inner = getattr(exc, "inner_exception", None)
    cause = inner if inner is not None else exc
    text = str(cause).strip()
    first = text.splitlines()[0] if text else ""
    where = f"{type(exc).__name__}: {type(inner).__name__}: " if inner is not None else f"{type(exc).__name__}: "
    return (where + first)[:300]
