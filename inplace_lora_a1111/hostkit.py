"""The host-neutral helpers the Forge adapter shares with the ComfyUI adapter, in one import.

Forge keeps its UNet and CLIP the ComfyUI way (LDM names, `clip_l`/`clip_g` holders, weights loaded
as inference tensors), so the Forge adapter reuses `nodes/comfy_names.py` and `nodes/host_state.py`
instead of repeating them. Those files use package-relative imports (`from ..engine ...`), and in the
WebUI the repository is not a package: `engine` is a top-level module. They are therefore loaded
here under a private package whose `engine` *is* the top-level `engine` (same classes, so a
`ModelError` raised there is the one the job catches).

When the helpers move into the engine (a host-neutral `engine.hostkit`), this whole module becomes
`from engine.hostkit... import ...` of the same names.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_PACK = __name__ + "_pack"  # inplace_lora_a1111.hostkit_pack: never a real folder
_ENGINE_MODULES = ("engine", "engine.errors", "engine.model", "engine.lora", "engine.lora.names")


def _load(relative: str):
    """Import `<repo>/nodes/<relative>.py` with `..engine` resolving to the top-level `engine`."""
    if _PACK not in sys.modules:
        pack = types.ModuleType(_PACK)
        pack.__path__ = []  # a namespace with nothing of its own: every child is registered below
        sys.modules[_PACK] = pack
        for name in _ENGINE_MODULES:
            sys.modules[f"{_PACK}.{name}"] = importlib.import_module(name)
        nodes = types.ModuleType(f"{_PACK}.nodes")
        nodes.__path__ = [str(_ROOT / "nodes")]
        sys.modules[nodes.__name__] = nodes
    full = f"{_PACK}.nodes.{relative}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, _ROOT / "nodes" / f"{relative}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


_names = _load("comfy_names")
_state = _load("host_state")

layout_from_unet_config = _names.layout_from_unet_config
unet_layers = _names.unet_layers
text_encoders = _names.text_encoders
text_encoder_layers = _names.text_encoder_layers
borrowed_weights = _state.borrowed_weights
clip_backprop_guard = _state.clip_backprop_guard
unet_blocks = _state.unet_blocks
state_fingerprint = _state.state_fingerprint

__all__ = ["layout_from_unet_config", "unet_layers", "text_encoders", "text_encoder_layers", "borrowed_weights",
           "clip_backprop_guard", "unet_blocks", "state_fingerprint"]
