"""A torch.compile backend for the CPU compile tests that counts what Dynamo compiles.

It hands each graph Dynamo traced to the `aot_eager` backend (AOTAutograd's forward/backward split, run by
eager kernels) and keeps a weak reference to it, so a test can tell, without reading the engine's own
flags, how many graphs a run compiled and whether they were freed when the run ended.
"""

import gc
import weakref

import torch


class GraphCounter:
    def __init__(self):
        self.graphs: list[weakref.ref] = []
        self._aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(weakref.ref(gm))
        return self._aot_eager(gm, example_inputs)

    @property
    def compiled(self) -> int:
        """Graphs compiled with this backend so far."""
        return len(self.graphs)

    def alive(self) -> int:
        """Of those, the ones something still holds (after a garbage collection)."""
        gc.collect()
        return sum(ref() is not None for ref in self.graphs)
