"""Let the engine see Forge's own Linear layers as `nn.Linear` for the length of a session.

Forge (2.x and Neo) builds its models under `backend.operations.using_forge_operations`, which swaps
`torch.nn.Linear` for `ForgeOperations.Linear`: an `nn.Module` with `in_features`, `out_features`,
`weight` and `bias`, whose forward casts the weight (and adds Forge's online LoRAs) before
`F.linear`. It is not an `nn.Linear`, so the engine would find no Linear layer to put LoRA on.

`linear_views` gives each such module, for the session only, a class that derives from its own class
*and* from `nn.Linear`: its forward, weights, hooks and state dict stay exactly its own (its class
comes first in the MRO), but `isinstance(m, nn.Linear)` holds. The original class is put back on exit,
also after an error. Modules that already are Linears (ComfyUI/ldm_patched, A1111) are not touched.
"""

from __future__ import annotations

import contextlib

from torch import nn

_VIEWS: dict[type, type] = {}


def is_linear_like(module: nn.Module) -> bool:
    """A Linear in all but class: named Linear, with the features and a 2-D weight of that shape."""
    if isinstance(module, nn.Linear) or not type(module).__name__.endswith("Linear"):
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and weight is not None and tuple(weight.shape) == (module.out_features, module.in_features))


def view_class(cls: type) -> type:
    if cls not in _VIEWS:
        _VIEWS[cls] = type(cls.__name__, (cls, nn.Linear), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                                              "_viewed_class": cls})
    return _VIEWS[cls]


@contextlib.contextmanager
def linear_views(roots: list[nn.Module]):
    """View every Linear-like module under `roots` as an nn.Linear until exit; yields how many."""
    changed: list[tuple[nn.Module, type]] = []
    seen: set[int] = set()
    try:
        for root in roots:
            for module in root.modules():
                if id(module) in seen or not is_linear_like(module):
                    continue
                seen.add(id(module))
                changed.append((module, type(module)))
                module.__class__ = view_class(type(module))
        yield len(changed)
    finally:
        for module, cls in changed:
            module.__class__ = cls
