"""LoRA on OpenCLIP's fused attention (SD2's text encoder, SDXL's second one) without changing it.

OpenCLIP keeps q, k and v in one `nn.MultiheadAttention.in_proj_weight`, and the output projection is
read directly by `F.multi_head_attention_forward`, so forward hooks cannot reach any of the four.
Each of them is represented by a `SliceProxy`: a weightless Linear of the right shape that the engine
gives a LoRA like any other layer (kohya keys `..._self_attn_{q,k,v,out}_proj`, all four per layer,
which is what A1111's loader needs to merge them back). Called with an identity matrix, a proxy
returns zeros, so its LoRA hook returns exactly the weight delta ΔWᵀ (zero when no LoRA is attached).

While `FusedAttentionLoRA.installed()` is active, each attention module has a per-instance `forward`
that adds the four deltas to its weights through `torch.func.functional_call` and otherwise runs the
module's own (possibly host-patched) forward. Leaving the block deletes the instance attribute: the
module's parameters, state-dict keys and class are never changed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

SLOTS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SliceProxy(nn.Linear):
    """A stand-in Linear (no weights) for one projection inside a fused attention module."""

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_features)

    def weight_delta(self, device, dtype=torch.float32) -> torch.Tensor | None:
        """ΔW [out, in] from the LoRA hooks on this proxy, or None when nothing is attached."""
        if not self._forward_hooks:
            return None
        eye = torch.eye(self.in_features, device=device, dtype=dtype)
        return self(eye).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, proxy=True"


class FusedAttentionLoRA:
    """The proxies of every fused attention module of one text encoder, and the forward wrappers."""

    def __init__(self):
        self.proxies: dict[nn.MultiheadAttention, tuple[SliceProxy, ...]] = {}

    def proxies_for(self, mha: nn.MultiheadAttention) -> tuple[SliceProxy, ...]:
        if mha not in self.proxies:
            if not getattr(mha, "_qkv_same_embed_dim", True):
                raise TypeError("attention with separate q/k/v weights is not an OpenCLIP text encoder")
            e = mha.embed_dim
            self.proxies[mha] = tuple(SliceProxy(e, e) for _ in SLOTS)
        return self.proxies[mha]

    @contextlib.contextmanager
    def installed(self):
        wrapped = []
        try:
            for mha in self.proxies:
                if "forward" in mha.__dict__:
                    raise RuntimeError("another extension wraps this text encoder's attention; "
                                       "text-encoder LoRA cannot be trained on it")
                mha.forward = _forward_with_lora(mha, self.proxies[mha])
                wrapped.append(mha)
            yield len(wrapped)
        finally:
            for mha in wrapped:
                mha.__dict__.pop("forward", None)


def _forward_with_lora(mha: nn.MultiheadAttention, proxies: tuple[SliceProxy, ...]):
    busy = [False]

    def forward(*args, **kwargs):
        if busy[0]:  # the inner call made by functional_call: run the module's own forward
            return type(mha).forward(mha, *args, **kwargs)
        w_in, w_out = mha.in_proj_weight, mha.out_proj.weight
        deltas = [p.weight_delta(w_in.device) for p in proxies]
        if all(d is None for d in deltas):
            return type(mha).forward(mha, *args, **kwargs)
        e = mha.embed_dim
        deltas = [torch.zeros(e, e, device=w_in.device) if d is None else d for d in deltas]
        params = {"in_proj_weight": w_in + torch.cat(deltas[:3]).to(w_in.dtype),
                  "out_proj.weight": w_out + deltas[3].to(w_out.dtype)}
        busy[0] = True
        try:
            return torch.func.functional_call(mha, params, args, kwargs)
        finally:
            busy[0] = False

    return forward
