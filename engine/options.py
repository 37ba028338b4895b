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
    # the CUDA-graph step's body without a graph on any device (FastStep(capture=False)), whatever the
    # config: how the CPU tests check that the graphed step trains exactly like the plain one
    fast_step_without_graph: bool = False
    compile_backend: Any = "inductor"  # torch.compile's backend for `torch_compile: true` (tests: aot_eager)
    compile_devices: tuple[str, ...] = ("cuda",)  # where `torch_compile: true` compiles (compiled_loss.py says why)
