"""The model families the engine trains, one file each, and the registry that finds them by name.

    get_family("sdxl") -> FamilySpec     # what the engine needs to know about SDXL, as data
    FAMILIES                             # every family, by name, in the order messages list them
    supported_text()                     # "SD1.x, SD2.x and SDXL": what every host trains, for messages

A family is added by writing its file (a `SPEC = FamilySpec(...)`), listing it in `_MODULES`, and
mapping it in each host adapter (which host modules are its denoiser and encoders).
"""

from __future__ import annotations

from ..errors import ModelError
from . import flux1, sd1, sd2, sdxl
from .base import FamilySpec, TextEncoderSpec

_MODULES = (sd1, sd2, sdxl, flux1)
# the families every host trains (ComfyUI, the WebUI tab, the command line); Flux.1 trains in ComfyUI and
# on the command line only, and the hosts name it in their own messages
EVERY_HOST = ("sd1", "sd2", "sdxl")
FAMILIES: dict[str, FamilySpec] = {m.SPEC.name: m.SPEC for m in _MODULES}


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; this trainer trains {supported_text()}.") from None


def supported_text(conjunction: str = "and", families: tuple[str, ...] = EVERY_HOST) -> str:
    """"SD1.x, SD2.x and SDXL": the families (by default those every host trains), as messages list them."""
    names = [FAMILIES[name].display_name for name in families]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}" if len(names) > 1 else names[0]


__all__ = ["EVERY_HOST", "FAMILIES", "FamilySpec", "TextEncoderSpec", "get_family", "supported_text"]
