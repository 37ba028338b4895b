"""The text encoders of ComfyUI-style CLIP holders (ComfyUI, Forge), as the engine names them.

ComfyUI keeps its CLIP text models with transformers' names under `clip_l.transformer` /
`clip_h.transformer` / `clip_g.transformer` of its `cond_stage_model`; Forge holds the same layout.
Which holder attribute is which of the family's encoders is the table below; the kohya prefixes are the
family's (engine/families). Pure torch: no host import.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from ..errors import ModelError
from ..families import get_family

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# family -> the holder attribute of each text encoder, in the family's order
HOLDER_ATTRS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g"),
                "flux1": ("clip_l",)}  # Flux's T5 (`t5xxl`) is never trained


def text_encoders(cond_stage_model: nn.Module, family: str) -> list[tuple[str, nn.Module, int | None]]:
    """(kohya prefix, HF-style text model, layers kept or None for all) per encoder of the family.

    SD1 has `clip_l`, SD2 `clip_h`, SDXL `clip_l` + `clip_g`. An encoder the family reads below its top
    keeps only the layers the family's spec names (SD2 reads the penultimate layer: diffusers' and
    kohya's SD2 encoder stops at 23 layers, ComfyUI's holds all 24).
    """
    spec = get_family(family)

    def transformer(attr: str) -> nn.Module | None:
        holder = getattr(cond_stage_model, attr, None)
        return getattr(holder, "transformer", None) if holder is not None else None

    attrs = HOLDER_ATTRS[family]
    if len(attrs) > 1:
        found = [transformer(a) for a in attrs]
        if any(te is None for te in found):
            raise ModelError(f"this {spec.display_name} CLIP has no {'/'.join(attrs)} text encoders; load the "
                             f"checkpoint's own CLIP.")
    else:
        te = transformer(attrs[0]) or transformer("clip_l") or transformer("clip_h")
        if te is None:
            raise ModelError(f"the CLIP input has no {attrs[0]} text encoder; connect the CLIP output of the same "
                             f"Load Checkpoint node as the MODEL.")
        found = [te]
    return [(te_spec.kohya_prefix, te, te_spec.layers) for te_spec, te in zip(spec.text_encoders, found)]


def text_encoder_layers(encoders: list[tuple[str, nn.Module, int | None]]) -> Iterator[tuple[str, str, nn.Module]]:
    """Every Linear of the encoders as (kohya prefix, HF name such as `text_model.encoder.layers.0.mlp.fc1`)."""
    for prefix, te, kept in encoders:
        for name, module in te.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            m = _LAYER_INDEX.search("." + name + ".")
            if kept is not None and m and int(m.group(1)) >= kept:
                continue
            yield prefix, name, module
