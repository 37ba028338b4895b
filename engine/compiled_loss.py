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

Each run compiles its own graphs and drops them at its end. Dynamo keeps what it compiled on the code
object of the compiled function, and that is one object for every run of a process (a module-level
function, a method, a closure made per run: all share their code). In a host that trains many runs in
one process (ComfyUI, the WebUI), earlier runs' graphs (other bucket shapes, ranks, fp8, models) would
pile up there until torch's recompile limit, after which every later run trains uncompiled with only
a Dynamo warning in the console, and each old graph's guards pin what they reference for the life of
the process. So `CompiledLoss` compiles a copy of the function with a code object of its own
(`own_code`), and `release` drops that copy's graphs when the run ends; `torch._dynamo.reset()` would
drop the host's own compiled models too (ComfyUI's TorchCompileModel node, the WebUI's users). A graph
break would compile the frames below it on their own code objects, which no run owns; the tiny SD1.5
and Flux traces have none (tests/engine/test_torch_compile.py, test_flux_compile.py check).
"""

from __future__ import annotations

import contextlib
import logging
import types
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
    return CompiledLoss(loss, say, "the step", backend=backend)


def compiles_on(device: torch.device, say: Callable[[str], None], devices: tuple[str, ...] | None = None) -> bool:
    """Whether `torch_compile: true` compiles on `device`; where it does not, says so."""
    if device.type in (devices or DEVICES):
        return True
    say(f"torch_compile: runs on CUDA only (on {device.type}, torch's inductor can return wrong "
        f"gradients); training without it")
    return False


class CompiledLoss:
    """Call the compiled function (a loss, a layer, a block) for one run; `what` names it to the user.

    A compile failure is said once and the plain function runs from then on. Each input shape (bucket
    and batch size) gets its graphs at its first call, for at most `MAX_GRAPHS` shapes, as the CUDA-graph
    step captures at most that many: later shapes run the plain function, and the user hears it once.
    `graphs_per_shape`: how many graphs one input shape may need (a block called with and without inputs
    that need gradients compiles twice). `release` drops the run's graphs (the module docstring says why)."""

    def __init__(self, loss: Callable[..., torch.Tensor], say: Callable[[str], None] | None = None,
                 what: str = "the step", *, backend: str | None = None, graphs_per_shape: int = 1):
        self.plain = loss
        self.own = own_code(loss)
        self.compiled = torch.compile(self.own, dynamic=False, backend=backend or BACKEND)
        self.say = say or (lambda message: None)
        self.what = what
        self.graphs_per_shape = graphs_per_shape
        self.shapes: set[tuple] = set()
        self.told_limit = False
        self.told_recompiles = False
        self.failed: str | None = None

    def __call__(self, *args) -> torch.Tensor:
        if self.failed is None and self._compiles(args):
            try:
                with _compile_settings(MAX_GRAPHS * self.graphs_per_shape):
                    return self.compiled(*args)
            except _RECOMPILE_LIMIT as exc:  # raised before the frame runs: nothing of this call has happened yet
                self._say_recompiles(exc)
            except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or code generation, not the run
                self.failed = _reason(exc)
                logger.warning("torch.compile could not compile %s (%s); training without it", self.what, self.failed)
                self.say(f"torch_compile: could not compile {self.what} ({self.failed}); training without it")
        return self.plain(*args)

    def _compiles(self, args) -> bool:
        """Whether this call's input shape is one of the run's first `MAX_GRAPHS`."""
        key = tuple(tuple(x.shape) for x in torch.utils._pytree.tree_leaves(args) if isinstance(x, torch.Tensor))
        if key in self.shapes or len(self.shapes) < MAX_GRAPHS:
            self.shapes.add(key)
            return True
        if not self.told_limit:
            self.told_limit = True
            self.say(f"torch_compile: more than {MAX_GRAPHS} input shapes (bucket and batch sizes) in this run, "
                     f"the most one run compiles; shapes beyond the first {MAX_GRAPHS} run {self.what} uncompiled")
        return False

    def _say_recompiles(self, exc: Exception) -> None:
        """Once: a shape this run already compiled needed yet another graph (something else the graphs are
        guarded on changed: a module attribute, a dtype, checkpointing turned on by the out-of-memory
        recovery), and the graphs are at their limit. Dynamo would otherwise run such calls uncompiled with
        only a warning in the console; the calls that match a compiled graph stay compiled."""
        if self.told_recompiles:
            return
        self.told_recompiles = True
        logger.warning("torch.compile: %s hit the recompile limit (%s)", self.what, exc)
        self.say(f"torch_compile: {self.what} needed more than the {MAX_GRAPHS * self.graphs_per_shape} graphs one "
                 f"run compiles (something it is compiled for changed during the run, such as checkpointing "
                 f"turned on by the out-of-memory recovery); calls that need a new graph run {self.what} "
                 f"uncompiled")

    def release(self) -> None:
        """Drop the graphs compiled so far (the run's end): they live on `own`'s code object, no other."""
        reset = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
        code = getattr(getattr(self.own, "__func__", self.own), "__code__", None)
        if reset is not None and self.own is not self.plain and code is not None:
            reset(code)


def own_code(fn: Callable) -> Callable:
    """`fn` (a function, or a method bound to its object) as a function with a code object of its own, so
    that what Dynamo compiles for it is kept on that code object, not on the one every run shares; any
    other callable as it is. The copy reads the same globals and closure cells; it is not marked as
    wrapping `fn` (`__wrapped__`), so nothing unwraps it back to the shared code."""
    if isinstance(fn, types.MethodType):
        func = own_code(fn.__func__)
        return fn if func is fn.__func__ else types.MethodType(func, fn.__self__)
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    copy.__annotations__ = fn.__annotations__
    copy.__dict__.update(fn.__dict__)  # a decorated function's own `__wrapped__` among them
    return copy


def _compile_settings(graphs: int = MAX_GRAPHS):
    """Set only around our call, so the host's settings stay: `graphs` compiled graphs (one per bucket
    shape, as many as the CUDA graphs: torch's default stops at 8 and runs later shapes uncompiled); and the backward
    compiled with the forward (torch defers it to the first backward, where a failure would end the
    run instead of falling back here)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=graphs))
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # raise, so that CompiledLoss can say it
        stack.enter_context(torch._dynamo.config.patch(fail_on_recompile_limit_hit=True))
    functorch_config = torch._functorch.config
    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        stack.enter_context(functorch_config.patch(force_non_lazy_backward_lowering=True))
    return stack


# what Dynamo raises at its recompile limit where `fail_on_recompile_limit_hit` is set (not a TorchDynamoException)
_RECOMPILE_LIMIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


def _reason(exc: Exception) -> str:
    """One line: the wrapper's name and the first line of what went wrong inside it (a backend
    failure wraps the compiler's own exception)."""
    inner = getattr(exc, "inner_exception", None)
    cause = inner if inner is not None else exc
    text = str(cause).strip()
    first = text.splitlines()[0] if text else ""
    where = f"{type(exc).__name__}: {type(inner).__name__}: " if inner is not None else f"{type(exc).__name__}: "
    return (where + first)[:300]
