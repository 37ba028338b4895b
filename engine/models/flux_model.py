"""The Flux.1 transformer as a plain module tree in Black Forest Labs' names, for the standalone path.

`FluxTransformer(dims)` holds exactly the tensors of a BFL `flux1-dev.safetensors` under the same names
(`img_in`, `double_blocks.0.img_attn.qkv`, `double_blocks.0.img_attn.norm.query_norm.scale`, ...), so a
BFL file loads into it with `load_state_dict(strict=True)` and kohya's key rule reads its Linear names
as they are. It has no forward code of its own: `engine/models/flux_forward.py` runs any module tree in
these names (this one, or ComfyUI's loaded Flux), out of place, so autograd can run through it.
"""

from __future__ import annotations

import torch
from torch import nn

from .flux_tiny import HEAD_DIM, FluxDims, flux_linear_shapes


class _Scale(nn.Module):
    """An RMSNorm's weight, named `scale` as in BFL files."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(HEAD_DIM))


class _QKNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_norm, self.key_norm = _Scale(), _Scale()


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Put `module` at `dotted` under `root`, creating the plain containers on the way."""
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


class FluxTransformer(nn.Module):
    """Flux.1's tensors in BFL names; `dims` says how many blocks and how wide (engine/models/flux_tiny.py)."""

    def __init__(self, dims: FluxDims, dtype: torch.dtype | None = None):
        super().__init__()
        self.dims = dims
        self.double_blocks = nn.ModuleList(nn.Module() for _ in range(dims.depth))
        self.single_blocks = nn.ModuleList(nn.Module() for _ in range(dims.depth_single))
        for name, (out_f, in_f) in flux_linear_shapes(dims).items():
            bias = dims.qkv_bias or not name.endswith("attn.qkv")
            _attach(self, name, nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
        for i in range(dims.depth):
            for stream in ("img", "txt"):
                _attach(self, f"double_blocks.{i}.{stream}_attn.norm", _QKNorm())
        for i in range(dims.depth_single):
            _attach(self, f"single_blocks.{i}.norm", _QKNorm())
        if dtype is not None:
            self.to(dtype)

    def forward(self, x, sigma, context, pooled, guidance=None, checkpoint: bool = False):
        from .flux_forward import flux_forward

        return flux_forward(self, x, sigma, context, pooled, guidance, checkpoint=checkpoint)


def flux_dims_from_state_dict(sd) -> FluxDims:
    """The dims a BFL state dict (or its shapes) implies, read as ComfyUI and kohya read them."""
    def shape(key):
        v = sd[key]
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    keys = set(sd)
    depth = len({k.split(".")[1] for k in keys if k.startswith("double_blocks.")})
    single = len({k.split(".")[1] for k in keys if k.startswith("single_blocks.")})
    hidden, in_channels = shape("img_in.weight")
    mlp = shape("double_blocks.0.img_mlp.0.weight")[0] if depth else 4 * hidden
    return FluxDims(hidden=hidden, depth=depth, depth_single=single, mlp_ratio=mlp / hidden,
                    in_channels=in_channels, vec_in=shape("vector_in.in_layer.weight")[1],
                    context_in=shape("txt_in.weight")[1], guidance_embed="guidance_in.in_layer.weight" in keys,
                    qkv_bias=depth == 0 or "double_blocks.0.img_attn.qkv.bias" in keys)
