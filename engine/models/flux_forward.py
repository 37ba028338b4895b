"""Flux.1's forward pass over any module tree in Black Forest Labs' names, out of place.

Both the engine's own `FluxTransformer` and ComfyUI's loaded `comfy.ldm.flux.model.Flux` name their
modules as BFL does, and each of their Linear layers casts its own weight when it runs (ComfyUI's
manual-cast ops cast fp8 weights to the compute dtype per call). This file calls those Linears and reads
the q/k RMSNorm scales, and does the rest itself, the way BFL's `flux/model.py` and ComfyUI's
`ldm/flux/layers.py` do it, with one difference: every residual add makes a new tensor. ComfyUI's blocks
add in place (`img += ...`) after a LayerNorm saved the same tensor for backward, so autograd through a
LoRA in its double blocks fails there; going through this file it does not, with or without
checkpointing. LoRA forward hooks on the Linears apply as on any other model. Without checkpointing each
block runs inside `flux_lean.lean_saves`: the q/k norms keep no float32 copies and the cheap tensors a
LoRA keeps (GELU outputs, LayerNorm/modulation outputs, concatenations) are kept as recipes, which
halves what a step holds for backward (engine/models/flux_lean.py; `python -m bench.flux_saved_bytes`).
Under `torch_compile: true` each block kind runs compiled (engine/models/flux_compile.py).

    velocity = flux_forward(root, x, sigma, context, pooled, guidance)   # x: [B, 16, H, W] latents

`x` is unpacked (as ComfyUI's `diffusion_model` takes it); it is packed into 2x2 patches with position
ids here and the velocity comes back unpacked, so objectives work on plain latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .flux_compile import compiled_pair
from .flux_lean import lean_saves, recomputed, rms_norm
from .flux_offload import offloaded_checkpoint, offloading
from .flux_tiny import HEAD_DIM

AXES_DIM, THETA = (16, 56, 56), 10000  # rotary axes (index, row, column) of Flux.1's 128-wide heads


# --- packing and positions ----------------------------------------------------------------------------

def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: 2x2 patches as tokens, channels-major within a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height `h` and width `w`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(b: int, h: int, w: int, device) -> torch.Tensor:
    """[B, H/2 * W/2, 3] position ids: (0, row, column) of each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(b, -1, -1)


def rope(ids: torch.Tensor) -> torch.Tensor:
    """Rotary matrices [B, 1, L, 64, 2, 2] (float32) for position ids [B, L, 3]."""
    parts = []
    for axis, dim in enumerate(AXES_DIM):
        omega = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = ids[..., axis].double()[..., None] * omega  # [B, L, dim/2]
        cos, sin = torch.cos(angles), torch.sin(angles)
        parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2))
    return torch.cat(parts, dim=-3).unsqueeze(1).float()


def _apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (cos first) of t * 1000, as BFL embeds sigma and guidance."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# --- the pieces of a block ------------------------------------------------------------------------------

def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift; a LoRA on the Linear it feeds keeps the recipe, not the tensor."""
    normed = recomputed(_layer_norm(x), _layer_norm, x)  # kept by the product for scale's gradient
    return recomputed(_modulate(normed, shift, scale), _modulate, normed, shift, scale)


def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * normed + shift


def _heads(qkv: torch.Tensor, norm, heads: int):
    """[B, L, 3*H*D] -> q, k, v [B, H, L, D], q and k RMS-normed."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
    return rms_norm(q, norm.query_norm.scale).to(v.dtype), rms_norm(k, norm.key_norm.scale).to(v.dtype), v


def _attention(q, k, v, pe) -> torch.Tensor:
    q, k = _apply_rope(q, pe), _apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    # a view of x where the kernel wrote [B, L, H, D] (CUDA's), else a copy: remade from x, which attention keeps
    return recomputed(_merge_heads(x), _merge_heads, x)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _linear(layer, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on x flattened to 2-D. The frozen layer and its LoRA's down projection then take their
    input gradients at one tensor, and autograd sums the second into the first in place; given a 3-D x,
    each flattens its own view of it and the two gradients arrive as views, which autograd sums into a
    new tensor: one more activation-sized buffer at a checkpointed step's peak (a 1024 px single block's
    linear2: 135 MiB; `python -m bench.flux_step_memory`). The same GEMMs, so the same values."""
    out = layer(x.reshape(-1, x.shape[-1]))
    return out.view(*x.shape[:-1], out.shape[-1])


def _modulation(lin, vec: torch.Tensor, chunks: int):
    """(shift, scale, gate) triples from the block's modulation Linear, each [B, 1, D]."""
    out = lin(F.silu(vec))[:, None, :].chunk(chunks, dim=-1)
    return [out[i:i + 3] for i in range(0, chunks, 3)]


def double_block(block, img, txt, vec, pe, heads: int):
    (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = _modulation(block.img_mod.lin, vec, 6)
    (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = _modulation(block.txt_mod.lin, vec, 6)
    iq, ik, iv = _heads(_linear(block.img_attn.qkv, _modulated(img, i_shift1, i_scale1)), block.img_attn.norm, heads)
    tq, tk, tv = _heads(_linear(block.txt_attn.qkv, _modulated(txt, t_shift1, t_scale1)), block.txt_attn.norm, heads)
    v = recomputed(_cat(tv, iv), _cat, tv, iv)  # tv, iv: views of what the q/k norms keep
    attn = _attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), v, pe)
    t_len = txt.shape[1]
    img = _residual(img, i_gate1, _linear(block.img_attn.proj, attn[:, t_len:]))
    img = img + i_gate2 * _mlp(block.img_mlp, _modulated(img, i_shift2, i_scale2))
    txt = _residual(txt, t_gate1, _linear(block.txt_attn.proj, attn[:, :t_len]))
    txt = txt + t_gate2 * _mlp(block.txt_mlp, _modulated(txt, t_shift2, t_scale2))
    return img, txt


def _residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, kept (by the next LayerNorm) as its recipe: x is the LayerNorm's kept input before,
    y what the product keeps for the gate's gradient."""
    return recomputed(_add_gated(x, gate, y), _add_gated, x, gate, y)


def _add_gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate * y


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat((a, b), 2)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _mlp(mlp, x):
    # getattr by index name: ComfyUI's mlp is an nn.Sequential, the engine's a plain container
    hidden = _linear(getattr(mlp, "0"), x)
    return _linear(getattr(mlp, "2"), recomputed(_gelu(hidden), _gelu, hidden))


def _attn_mlp(attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    return _CatCopyingBack.apply(attn, _gelu(mlp))


class _CatCopyingBack(torch.autograd.Function):
    """`torch.cat((a, b), -1)` whose backward hands `a` a copy of its part of the gradient, not a view.
    In a single block `b` (the GELU output, 4 widths) is consumed first in backward and `a` (attention,
    1 width) only after it; with views, a's part kept the whole 5-width gradient (135 MiB at 1024 px)
    alive through the attention backward, the step's peak. One 1-width copy (~20 us on an H100) frees it."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.split = a.shape[-1]
        return torch.cat((a, b), -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., :ctx.split].contiguous(), grad[..., ctx.split:]


def single_block(block, x, vec, pe, heads: int):
    ((shift, scale, gate),) = _modulation(block.modulation.lin, vec, 3)
    hidden = x.shape[-1]
    joint = _linear(block.linear1, _modulated(x, shift, scale))
    qkv, mlp = joint.split([3 * hidden, joint.shape[-1] - 3 * hidden], dim=-1)
    q, k, v = _heads(qkv, block.norm, heads)
    attn = _attention(q, k, v, pe)
    out = _linear(block.linear2, recomputed(_attn_mlp(attn, mlp), _attn_mlp, attn, mlp))
    return x + gate * out


# --- the whole model ----------------------------------------------------------------------------------

def _run(fn, checkpoint: bool, *args, offload: int = 0, lean: bool = True):
    """`offload`: how many leading args (the token tensors) cpu_offload_checkpointing keeps in host memory;
    `lean`: keep recipes of the cheap tensors without checkpointing (flux_lean.py; not for compiled blocks)."""
    if checkpoint and torch.is_grad_enabled():
        if offloading():
            return offloaded_checkpoint(fn, offload, *args)
        return _checkpoint(fn, *args, use_reentrant=False)
    with lean_saves(lean):
        return fn(*args)


def flux_forward(root, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: torch.Tensor | None = None, *, checkpoint: bool = False) -> torch.Tensor:
    """Velocity [B, 16, H, W] for latents `x` at noise level `sigma` [B] in [0, 1]; `context` [B, T, 4096]
    (T5), `pooled` [B, 768] (CLIP-L), `guidance` [B] for dev models. `checkpoint`: recompute each block
    in the backward pass (non-reentrant, so LoRA hooks and fp8 weight casts re-run as they ran)."""
    b, _, h, w = x.shape
    dtype = x.dtype
    img = root.img_in(pack(x))
    vec = root.time_in.out_layer(F.silu(root.time_in.in_layer(timestep_embedding(sigma).to(dtype))))
    if hasattr(root, "guidance_in"):
        if guidance is None:
            raise ValueError("this Flux model has a guidance input (dev); pass guidance (kohya trains with 1.0)")
        g = timestep_embedding(guidance).to(dtype)
        vec = vec + root.guidance_in.out_layer(F.silu(root.guidance_in.in_layer(g)))
    vec = vec + root.vector_in.out_layer(F.silu(root.vector_in.in_layer(pooled.to(dtype))))
    txt = root.txt_in(context.to(dtype))
    ids = torch.cat((torch.zeros(b, txt.shape[1], 3, device=x.device), image_ids(b, h, w, x.device)), dim=1)
    pe = rope(ids)
    heads = img.shape[-1] // HEAD_DIM
    compiled = compiled_pair()  # torch_compile: each block kind compiled once (flux_compile.py)
    double, single = compiled or (double_block, single_block)
    lean = compiled is None
    for block in root.double_blocks:
        img, txt = _run(lambda i, t, v, p, blk=block: double(blk, i, t, v, p, heads), checkpoint, img, txt, vec, pe,
                        offload=2, lean=lean)
    seq = torch.cat((txt, img), dim=1)
    for block in root.single_blocks:
        seq = _run(lambda s, v, p, blk=block: single(blk, s, v, p, heads), checkpoint, seq, vec, pe, offload=1,
                   lean=lean)
    img = seq[:, txt.shape[1]:]
    shift, scale = getattr(root.final_layer.adaLN_modulation, "1")(F.silu(vec)).chunk(2, dim=1)
    out = root.final_layer.linear((1 + scale[:, None]) * _layer_norm(img) + shift[:, None])
    return unpack(out, h, w)
