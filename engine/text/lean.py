"""The engine's own forward for Llama-class decoders (Llama, Mistral, Qwen2, Qwen3): transformers' math,
fewer kernels, fewer saved activations.

It reads the weights of the transformers model and of the PEFT LoRA layers wrapped around its
projections (nothing is copied or re-laid; PEFT saves, loads and merges them as usual) and differs
from transformers + PEFT in how a step is computed, not in what:

- the LoRA layers that read the same input (q/k/v; gate/up) share one dropout mask and one down
  projection (their A matrices side by side), and each up projection is added into the base layer's
  output in place (`addmm_`), where PEFT upcasts the input to float32, draws a mask per layer and adds
  a scaled copy;
- SwiGLU keeps only its two inputs for backward and recomputes the activation there (transformers
  keeps three tensors of the MLP's width per layer);
- RMSNorm is PyTorch's `rms_norm` (one fused kernel on CUDA), RoPE three elementwise kernels with the
  sign of the rotation folded into the sine, attention SDPA with grouped KV heads as they are;
- packed rows: samples in a row are kept apart by a mask built from the segment ids, and a batch
  whose rows hold one sample each takes the plain causal (flash) kernel;
- gradient checkpointing recomputes one decoder layer at a time; dropout masks are drawn outside the
  recomputed region, so recomputation is deterministic and needs no RNG state (nor does a CUDA graph).

`lean_reason(...)` says why a model cannot take this path (quantised weights, another layout, DoRA,
a sliding window shorter than the rows, ...); those train through transformers' own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LEAN_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Lora:
    A: torch.nn.Parameter  # [r, in]
    B: torch.nn.Parameter  # [out, r]
    scale: float
    dropout: float


@dataclass
class Proj:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: Lora | None


class _LoraDown(torch.autograd.Function):
    """drop(h) @ A.T with the dropout mask given; keeps drop(h) and the mask for backward."""

    @staticmethod
    def forward(ctx, h, a, mask, keep):
        x = h if mask is None else h * mask * (1.0 / keep)
        ctx.save_for_backward(x, a, mask)
        ctx.keep = keep
        return x @ a.t()

    @staticmethod
    def backward(ctx, grad):
        x, a, mask = ctx.saved_tensors
        grad_a = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = grad @ a
            if mask is not None:
                grad_h = grad_h * mask * (1.0 / ctx.keep)
        return grad_h, grad_a, None, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _proj(module) -> Proj:
    base = getattr(module, "base_layer", module)
    lora = None
    if hasattr(module, "lora_A") and "default" in module.lora_A:
        drop = module.lora_dropout["default"]
        lora = Lora(module.lora_A["default"].weight, module.lora_B["default"].weight,
                    float(module.scaling["default"]), float(getattr(drop, "p", 0.0)))
    return Proj(base.weight, base.bias, lora)


def lean_reason(lm, max_length: int) -> str | None:
    """Why the lean forward cannot run this (PEFT-wrapped) model, or None when it can."""
    config = lm.config
    kind = getattr(config, "model_type", "")
    if kind not in LEAN_TYPES:
        return f"{kind or type(lm).__name__} is not a Llama-class layout ({', '.join(LEAN_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (kind == "mistral" and window)
    if sliding and window and window < max_length:
        return f"sliding-window attention ({window} tokens) shorter than max_length"
    backbone = getattr(lm, "model", None)
    if backbone is None or not hasattr(backbone, "rotary_emb"):
        return "no rotary embedding module"
    for name, module in lm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if hasattr(module, "lora_A") and module.lora_A and leaf not in PROJECTIONS:
            return f"LoRA on {leaf} (the lean forward covers {', '.join(PROJECTIONS)})"
        if hasattr(module, "lora_A") and (any(getattr(module, "use_dora", {}).values())
                                          or list(module.lora_A) != ["default"]):
            return "DoRA or several adapters"
        if leaf in PROJECTIONS:
            base = getattr(module, "base_layer", module)
            if type(base) is not torch.nn.Linear or not base.weight.is_floating_point():
                return f"{leaf} is {type(base).__name__} (quantised weights)"
    return None


class LeanDecoder:
    """hidden = LeanDecoder(lm)(input_ids, position_ids, segments, masked, checkpointing): the last layer's
    normalised output, [B, S, H], as `lm.model(...)` gives it."""

    def __init__(self, lm):
        self.backbone = lm.model
        cfg = lm.config
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in self.backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                "qkv": [_proj(attn.q_proj), _proj(attn.k_proj), _proj(attn.v_proj)], "o": [_proj(attn.o_proj)],
                "gate_up": [_proj(mlp.gate_proj), _proj(mlp.up_proj)], "down": [_proj(mlp.down_proj)],
                "q_norm": getattr(getattr(attn, "q_norm", None), "weight", None),
                "k_norm": getattr(getattr(attn, "k_norm", None), "weight", None),
                "head_dim": attn.head_dim, "scaling": attn.scaling,
            })

    # --- pieces --------------------------------------------------------------------------------------
    @staticmethod
    def _masks(groups, rows: int, widths: list[int], device) -> list[torch.Tensor | None]:
        """One dropout mask per LoRA input (drawn outside any recomputed region)."""
        out = []
        for projs, width in zip(groups, widths):
            lora = next((p.lora for p in projs if p.lora is not None), None)
            if lora is None or lora.dropout <= 0:
                out.append(None)
            else:
                out.append(torch.empty(rows, width, dtype=torch.bool, device=device).bernoulli_(1 - lora.dropout))
        return out

    @staticmethod
    def _project(h: torch.Tensor, projs: list[Proj], mask) -> list[torch.Tensor]:
        outs = [F.linear(h, p.weight, p.bias) for p in projs]
        loras = [(out, p.lora) for out, p in zip(outs, projs) if p.lora is not None]
        if loras:
            a = torch.cat([lora.A for _, lora in loras]).to(h.dtype)
            keep = 1.0 - loras[0][1].dropout
            xa = _LoraDown.apply(h, a, mask, keep)
            at = 0
            for out, lora in loras:
                r = lora.A.shape[0]
                out.addmm_(xa[:, at:at + r], lora.B.to(h.dtype).t(), alpha=lora.scale)
                at += r
        return outs

    def _layer(self, x, cos, sin, attn_mask, L, m_qkv, m_o, m_gu, m_down):
        b, s, hidden = x.shape
        d = L["head_dim"]
        flat = x.reshape(b * s, hidden)
        q, k, v = self._project(F.rms_norm(flat, (hidden,), L["ln1"], self.eps), L["qkv"], m_qkv)
        q, k, v = q.view(b, s, -1, d), k.view(b, s, -1, d), v.view(b, s, -1, d)
        if L["q_norm"] is not None:
            q = F.rms_norm(q, (d,), L["q_norm"], self.eps)
            k = F.rms_norm(k, (d,), L["k_norm"], self.eps)
        q, k = _rope(q, cos, sin).transpose(1, 2), _rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L["scaling"],
                                                 enable_gqa=k.shape[1] != q.shape[1])
        else:
            groups = q.shape[1] // k.shape[1]
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=L["scaling"])
        (o,) = self._project(out.transpose(1, 2).reshape(b * s, -1), L["o"], m_o)
        flat = flat + o
        gate, up = self._project(F.rms_norm(flat, (hidden,), L["ln2"], self.eps), L["gate_up"], m_gu)
        (down,) = self._project(_SwiGLU.apply(gate, up), L["down"], m_down)
        return (flat + down).view(b, s, hidden)

    # --- the whole decoder -----------------------------------------------------------------------------
    def __call__(self, input_ids, position_ids, segments=None, masked: bool = False,
                 checkpointing: bool = False) -> torch.Tensor:
        backbone = self.backbone
        x = backbone.embed_tokens(input_ids)
        cos, sin = backbone.rotary_emb(x, position_ids)
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign, folded in
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        attn_mask = None
        if masked:
            s = input_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            attn_mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal
        training = backbone.training
        rows = input_ids.numel()
        for L in self.layers:
            widths = [x.shape[-1], L["o"][0].weight.shape[1], x.shape[-1], L["down"][0].weight.shape[1]]
            groups = [L["qkv"], L["o"], L["gate_up"], L["down"]]
            masks = self._masks(groups, rows, widths, x.device) if training else [None] * 4
            if checkpointing and training:
                x = checkpoint(self._layer, x, cos, sin, attn_mask, L, *masks, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = self._layer(x, cos, sin, attn_mask, L, *masks)
        return F.rms_norm(x, (x.shape[-1],), backbone.norm.weight, self.eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's sign already in `signed_sin`."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), signed_sin)
