"""How the engine runs a config, for benchmarks and tests: never a user setting (those are TrainConfig).

Each field turns one of the engine's own optimisations off, or lets a test reach a path it cannot
reach on the CPU otherwise. They are passed to `train(..., options=EngineOptions(...))`, so a
benchmark that measures what an optimisation buys selects it by name (bench/ours.py's ours-host-geglu,
ours-copy-up, ours-cast-each) and can never end up measuring the default path because a module was
renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineOptions:
    lean_geglu: bool = True  # GEGLUs that hold half for backward (engine/models/geglu.py); False: the host's own
    up_in_place: bool = True  # a lone Linear LoRA adds its up projection into the output (engine/lora/up_add.py)
    cast_together: bool = True  # LoRA weights cast to the compute dtype in a few kernels per step (lora/network.py)
    lean_flux: bool = True  # Flux blocks keep recipes of cheap tensors for backward (engine/models/flux_lean.py)
    # the CUDA-graph step's body without a graph on any device (FastStep(capture=False)), whatever the
    # config: how the CPU tests check that the graphed step trains exactly like the plain one
    fast_step_without_graph: bool = False
    compile_backend: Any = "inductor"  # torch.compile's backend for `torch_compile: true` (tests: aot_eager)
    # test hooks of the out-of-memory recovery (engine/memory/recovery.py): an out-of-memory error raised in
    # the last micro-batch of each listed optimizer step (1-based; a step listed twice fails twice), and
    # recovery changes applied before the listed steps as if an out-of-memory error had asked for them
    inject_oom_at: tuple[int, ...] = ()
    recovery_plan_at: tuple[tuple[int, str], ...] = ()
    # test hook of the NaN guard (engine/nan_guard.py): these optimizer steps get a NaN loss and NaN gradients
    # (the CUDA-graph step, which has already applied its update: NaN LoRA weights)
    inject_nan_at: tuple[int, ...] = ()
    # the stall watchdog (engine/watchdog.py): a step over (x the running median, and seconds) is reported;
    # `clock` replaces time.monotonic (tests step a fake clock)
    stall_after: tuple[float, float] = (10.0, 30.0)
    clock: Any = None
    compile_devices: tuple[str, ...] = ("cuda",)  # where `torch_compile: true` compiles (compiled_loss.py says why)
