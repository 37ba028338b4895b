"""The engine's own forward for Llama-class decoders (Llama, Mistral, Qwen2, Qwen3): transformers' math,
fewer kernels, fewer saved activations.

It runs on the transformers model's weights and the PEFT LoRA layers wrapped around its projections
(PEFT still saves, loads and merges them) and differs from transformers + PEFT in how a step is
computed, not in what:

- projections that read one input (q/k/v; gate/up) are one GEMM: building the decoder lays their frozen
  weights side by side in one matrix and makes each module's weight a view into it (no second copy;
  the modules, generation and PEFT see their weights as before);
- the LoRAs of such a group share one dropout mask (drawn and applied in one kernel each) and one down
  projection (their A matrices side by side), and each up projection is added into its columns of the
  group's output in place; backward is written out (one GEMM for the input gradient, none for the frozen
  weights), where PEFT upcasts each LoRA's input to float32, draws a mask per layer, adds a scaled copy
  and leaves autograd to sum three input gradients;
- q and k are rotated together (three elementwise kernels, the sign of rotate_half folded into the
  sine); attention is SDPA with grouped KV heads as they are;
- SwiGLU keeps only its two inputs for backward and recomputes the activation there (transformers keeps
  three tensors of the MLP's width per layer); RMSNorm is PyTorch's `rms_norm`;
- packed rows: samples in a row are kept apart by a mask built from the segment ids, and a batch whose
  rows hold one sample each takes the plain causal (flash) kernel;
- gradient checkpointing recomputes one decoder layer at a time; dropout masks are drawn outside the
  recomputed region and kept as bits (1/16 of the layer input they sit beside), so recomputation is
  deterministic and needs no RNG state (nor does a CUDA graph).

`lean_reason(...)` says why a model cannot take this path (quantised weights, another layout, DoRA,
a sliding window shorter than the rows, ...); those train through transformers' own forward.
Because the weights are re-laid in memory, a model trained here is saved through PEFT (adapter) or
reloaded from disk for merging (engine/text/save.py), never written with save_pretrained as it is.
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
class Group:
    """Projections that read one input, their frozen weights side by side in one matrix (the modules'
    own weights are views into it), and the LoRA of each, with the columns it adds into."""

    weight: torch.Tensor  # [sum of outs, in]
    bias: torch.Tensor | None
    widths: list[int]
    loras: list[tuple[int, Lora]]  # (first output column, LoRA)

    @property
    def dropout(self) -> float:
        return self.loras[0][1].dropout if self.loras else 0.0


def _keep_mask(rows: int, width: int, keep: float, device) -> torch.Tensor:
    """A dropout mask, True with probability `keep`, one byte an element."""
    mask = torch.empty(rows, width, dtype=torch.bool, device=device)
    try:
        return mask.bernoulli_(keep)
    except (RuntimeError, NotImplementedError):  # a build without bool bernoulli
        return torch.rand(rows, width, device=device) < keep


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask [R, W] as bits, [R, W/8] uint8: what a checkpointed layer keeps of its dropout."""
    rows, width = mask.shape
    bits = mask.view(rows, width // 8, 8).to(torch.uint8) << _shifts(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    rows, width = packed.shape
    return ((packed.unsqueeze(-1) >> _shifts(packed.device)) & 1).view(rows, width * 8).bool()


def _shifts(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)  # made on the device: no copy inside a CUDA graph


def _drop(x: torch.Tensor, mask, keep: float) -> torch.Tensor:
    """x * mask / keep in one kernel (what dropout's backward computes)."""
    return x if mask is None else torch.ops.aten.native_dropout_backward(x, mask, 1.0 / keep)


class _Projection(torch.autograd.Function):
    """out = h @ W.T + b, with each LoRA's scale * drop(h) @ A.T @ B.T added into its own columns.

    One GEMM for the frozen weights of the group, one for the down projections of all its LoRAs (their
    A side by side), one in-place `addmm_` per up projection. Backward: one GEMM for the input gradient,
    the LoRA gradients from drop(h) and the small down-projected activations, and no gradient for W."""

    @staticmethod
    def forward(ctx, h, weight, bias, a, mask, meta, *bs):
        keep, starts, scales = meta
        out = torch.nn.functional.linear(h, weight, bias)
        x = xa = None
        if a is not None:
            x = _drop(h, mask, keep)
            xa = x @ a.t()
            at = 0
            for start, b, scale in zip(starts, bs, scales):
                r = b.shape[1]
                out[:, start:start + b.shape[0]].addmm_(xa[:, at:at + r], b.t(), alpha=scale)
                at += r
        ctx.meta = meta
        ctx.save_for_backward(weight, a, x, xa, mask, *bs)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, a, x, xa, mask, *bs = ctx.saved_tensors
        keep, starts, scales = ctx.meta
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None
        grad_a, grad_bs = None, [None] * len(bs)
        if a is not None:
            pieces, at = [], 0
            for i, (start, b, scale) in enumerate(zip(starts, bs, scales)):
                g = grad[:, start:start + b.shape[0]]
                r = b.shape[1]
                grad_bs[i] = (g.t() @ xa[:, at:at + r]).mul_(scale)
                pieces.append(g @ b.mul(scale))
                at += r
            grad_xa = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
            grad_a = grad_xa.t() @ x
            if grad_h is not None:
                if mask is None:
                    grad_h.addmm_(grad_xa, a)
                else:
                    grad_h.add_(_drop(grad_xa @ a, mask, keep))
        return (grad_h, None, None, grad_a, None, None, *grad_bs)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the gate/up projection's output [T, 2I] (gate first), keeping only that for
    backward and recomputing the activation there; the gradient is written as one [T, 2I] tensor."""

    @staticmethod
    def forward(ctx, gate_up, width):
        ctx.save_for_backward(gate_up)
        ctx.width = width
        return F.silu(gate_up[:, :width]) * gate_up[:, width:]

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up[:, :ctx.width], gate_up[:, ctx.width:]
        if torch.compiler.is_compiling():  # inductor fuses these into one kernel itself
            return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), dim=1), None
        out = torch.empty_like(gate_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[:, :ctx.width])
        torch.mul(grad, F.silu(gate), out=out[:, ctx.width:])
        return out, None


def _swap(x: torch.Tensor) -> torch.Tensor:
    """The two halves of the last dimension swapped (rotate_half without its sign)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out=None) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's sign already in `signed_sin`. Its transpose is
    the same formula with `_swap(signed_sin)` for the sine: that is the backward."""
    return torch.addcmul(x * cos, _swap(x), signed_sin, out=out)


class _QKV(torch.autograd.Function):
    """Rotated q and k and plain v from the q/k/v projection's output [B, S, heads, D]; backward writes
    their gradients into one tensor of that shape (no zero-filled copies per slice)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, sin_swapped, nq, nkv):
        ctx.save_for_backward(cos, sin_swapped)
        ctx.nq, ctx.nkv = nq, nkv
        q = _rope(qkv[:, :, :nq], cos, sin)
        k = _rope(qkv[:, :, nq:nq + nkv], cos, sin)
        return q, k, qkv[:, :, nq + nkv:].clone()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin_swapped = ctx.saved_tensors
        nq, nkv = ctx.nq, ctx.nkv
        if torch.compiler.is_compiling():  # inductor fuses these into one kernel itself
            return (torch.cat((_rope(grad_q, cos, sin_swapped), _rope(grad_k, cos, sin_swapped), grad_v), dim=2),
                    None, None, None, None, None)
        out = torch.empty(grad_q.shape[:2] + (nq + 2 * nkv, grad_q.shape[3]), dtype=grad_q.dtype,
                          device=grad_q.device)
        for grad, part in ((grad_q, out[:, :, :nq]), (grad_k, out[:, :, nq:nq + nkv])):
            if grad is None:
                part.zero_()
            else:
                _rope(grad, cos, sin_swapped, out=part)
        out[:, :, nq + nkv:] = 0 if grad_v is None else grad_v
        return out, None, None, None, None, None


def _lora(module) -> Lora | None:
    if not (hasattr(module, "lora_A") and "default" in module.lora_A):
        return None
    drop = module.lora_dropout["default"]
    return Lora(module.lora_A["default"].weight, module.lora_B["default"].weight, float(module.scaling["default"]),
                float(getattr(drop, "p", 0.0)))


def fuse(modules) -> Group:
    """One matrix for the frozen weights of `modules` (projections of one input); each module's weight
    (and bias) becomes a view into it, so nothing is held twice and PEFT, generation and saving still
    see the modules as they were."""
    bases = [getattr(m, "base_layer", m) for m in modules]
    if len(bases) == 1:
        weight, bias = bases[0].weight, bases[0].bias
    else:
        weight = torch.cat([b.weight.data for b in bases])
        with_bias = [b.bias is not None for b in bases]
        bias = torch.cat([b.bias.data if b.bias is not None else weight.new_zeros(b.weight.shape[0])
                          for b in bases]) if any(with_bias) else None
        at = 0
        for b, has_bias in zip(bases, with_bias):
            n = b.weight.shape[0]
            b.weight.data = weight[at:at + n]
            if has_bias:
                b.bias.data = bias[at:at + n]
            at += n
    widths = [b.weight.shape[0] for b in bases]
    loras, at = [], 0
    for m, n in zip(modules, widths):
        lora = _lora(m)
        if lora is not None:
            loras.append((at, lora))
        at += n
    return Group(weight, bias, widths, loras)


def project(h: torch.Tensor, group: Group, mask) -> torch.Tensor:
    """The group's outputs side by side, [T, sum of widths]."""
    if not group.loras:
        return _Projection.apply(h, group.weight, group.bias, None, None, (1.0, (), ()))
    a = torch.cat([lora.A for _, lora in group.loras]).to(h.dtype)
    bs = [lora.B.to(h.dtype) for _, lora in group.loras]
    meta = (1.0 - group.dropout, tuple(s for s, _ in group.loras), tuple(lora.scale for _, lora in group.loras))
    return _Projection.apply(h, group.weight, group.bias, a, mask, meta, *bs)


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
    normalised output, [B, S, H], as `lm.model(...)` gives it. Building it lays each layer's q/k/v and
    gate/up weights side by side (see `fuse`)."""

    def __init__(self, lm):
        self.backbone = lm.model
        self.run_layer = self._layer  # what training calls: the layer, or the layer compiled (step.py)
        self.eps = lm.config.rms_norm_eps
        self.layers = []
        for layer in self.backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                "qkv": fuse([attn.q_proj, attn.k_proj, attn.v_proj]), "o": fuse([attn.o_proj]),
                "gate_up": fuse([mlp.gate_proj, mlp.up_proj]), "down": fuse([mlp.down_proj]),
                "q_norm": getattr(getattr(attn, "q_norm", None), "weight", None),
                "k_norm": getattr(getattr(attn, "k_norm", None), "weight", None),
                "head_dim": attn.head_dim, "scaling": attn.scaling,
            })

    # --- pieces --------------------------------------------------------------------------------------
    @staticmethod
    def _masks(layer: dict, rows: int, device, packed: bool) -> list[torch.Tensor | None]:
        """One dropout mask per LoRA input, drawn outside any recomputed region; as bits when the layer is
        checkpointed (the mask is all it keeps besides its input, so 1 bit an element instead of 8)."""
        out = []
        for name in ("qkv", "o", "gate_up", "down"):
            group = layer[name]
            keep, width = 1.0 - group.dropout, group.weight.shape[1]
            mask = _keep_mask(rows, width, keep, device) if group.loras and keep < 1 else None
            out.append(_pack(mask) if mask is not None and packed and width % 8 == 0 else mask)
        return out

    def _layer(self, x, rotation, attn_mask, L, *masks):
        cos, sin, sin_swapped = rotation
        m_qkv, m_o, m_gu, m_down = (_unpack(m) if m is not None and m.dtype == torch.uint8 else m for m in masks)
        b, s, hidden = x.shape
        d = L["head_dim"]
        nq, nkv = L["qkv"].widths[0] // d, L["qkv"].widths[1] // d
        flat = x.reshape(b * s, hidden)
        qkv = project(F.rms_norm(flat, (hidden,), L["ln1"], self.eps), L["qkv"], m_qkv).view(b, s, nq + 2 * nkv, d)
        if L["q_norm"] is None:
            q, k, v = _QKV.apply(qkv, cos, sin, sin_swapped, nq, nkv)
        else:  # Qwen3 normalises q and k per head before rotating them
            q = _rope(F.rms_norm(qkv[:, :, :nq], (d,), L["q_norm"], self.eps), cos, sin)
            k = _rope(F.rms_norm(qkv[:, :, nq:nq + nkv], (d,), L["k_norm"], self.eps), cos, sin)
            v = qkv[:, :, nq + nkv:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L["scaling"], enable_gqa=nkv != nq)
        else:
            if nkv != nq:
                k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=L["scaling"])
        flat = flat + project(out.transpose(1, 2).reshape(b * s, nq * d), L["o"], m_o)
        gate_up = project(F.rms_norm(flat, (hidden,), L["ln2"], self.eps), L["gate_up"], m_gu)
        flat = flat + project(_SwiGLU.apply(gate_up, L["gate_up"].widths[0]), L["down"], m_down)
        return flat.view(b, s, hidden)

    # --- the whole decoder -----------------------------------------------------------------------------
    def __call__(self, input_ids, position_ids, segments=None, masked: bool = False,
                 checkpointing: bool = False) -> torch.Tensor:
        backbone = self.backbone
        x = backbone.embed_tokens(input_ids)
        cos, sin = backbone.rotary_emb(x, position_ids)
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign, folded in
        rotation = (cos.unsqueeze(2), sin.unsqueeze(2), _swap(sin).unsqueeze(2))
        attn_mask = None
        if masked:
            s = input_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            attn_mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal
        training = backbone.training
        for L in self.layers:
            masks = self._masks(L, input_ids.numel(), x.device, checkpointing) if training else [None] * 4
            layer = self.run_layer if training else self._layer
            if checkpointing and training:
                x = checkpoint(layer, x, rotation, attn_mask, L, *masks, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = layer(x, rotation, attn_mask, L, *masks)
        return F.rms_norm(x, (x.shape[-1],), backbone.norm.weight, self.eps)

