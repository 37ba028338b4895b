"""diffusers' `FluxTransformer2DModel` state dict -> Black Forest Labs' names, so a diffusers Flux.1
folder (`transformer/`) loads into the engine's `FluxTransformer` as a BFL file does.

The two layouts hold the same numbers cut differently: diffusers keeps attention's q, k and v as three
Linears (`attn.to_q/to_k/to_v`, the text stream's `add_q/k/v_proj`) where BFL has one `qkv`, and the
single blocks' q, k, v and MLP input as four (`to_q/k/v`, `proj_mlp`) where BFL has one `linear1`; these
are concatenated along the output dimension in that order. The final AdaLayerNorm's linear produces
(scale, shift) in diffusers and (shift, scale) in BFL, so its two halves swap. The modulations of the
blocks (shift, scale, gate per sub-layer) are in the same order in both. Everything else is a rename.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError

_RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_RENAMES = {"norm.linear": "modulation.lin", "proj_out": "linear2",
                   "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def is_diffusers_flux(sd) -> bool:
    return "x_embedder.weight" in sd and any(k.startswith("single_transformer_blocks.") for k in sd)


def diffusers_to_bfl(sd: dict[str, torch.Tensor], name: str = "transformer") -> dict[str, torch.Tensor]:
    """The BFL state dict of a diffusers Flux transformer; every key is used or the load stops, naming it."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (BFL module, weight|bias) -> parts
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in _RENAMES:
            out[f"{_RENAMES[module]}.{leaf}"] = value
        elif module == "norm_out.linear":  # (scale, shift) -> (shift, scale)
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale], dim=0)
        elif (m := _BLOCK.match(key)) is not None:
            kind, index, inner, leaf = m.groups()
            double = kind == "transformer_blocks"
            prefix = f"{'double' if double else 'single'}_blocks.{index}"
            renames, fusions = (_DOUBLE_RENAMES, _DOUBLE_FUSED) if double else (_SINGLE_RENAMES, _SINGLE_FUSED)
            if inner in renames:
                target = renames[inner]
                out[f"{prefix}.{target}.{'scale' if target.endswith('_norm') else leaf}"] = value
                continue
            target = next((t for t, parts in fusions.items() if inner in parts), None)
            if target is None:
                raise ModelError(f"'{name}': unexpected diffusers Flux tensor {key}; is it a Flux.1 transformer?")
            fused.setdefault((f"{prefix}.{target}", leaf), {})[inner] = value
        else:
            raise ModelError(f"'{name}': unexpected diffusers Flux tensor {key}; is it a Flux.1 transformer?")
    for (target, leaf), parts in fused.items():
        block = "double" if target.startswith("double_blocks.") else "single"
        order = (_DOUBLE_FUSED if block == "double" else _SINGLE_FUSED)[target.split(".", 2)[2]]
        missing = [p for p in order if p not in parts]
        if missing:
            raise ModelError(f"'{name}': {target} lacks {', '.join(missing)} ({leaf}); the transformer is incomplete.")
        out[f"{target}.{leaf}"] = torch.cat([parts[p] for p in order], dim=0)
    return out
