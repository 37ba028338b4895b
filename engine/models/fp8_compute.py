"""fp8_compute: the frozen denoiser's large Linear layers multiply on fp8 tensor cores.

At SDXL 1024 batch 8 the step is compute-bound, and most of its FLOPs are the transformer blocks'
Linear layers (attention projections, feed-forward, proj_in/out). An H100's fp8 tensor cores run at
twice the bf16 rate. Here each such layer's forward product and its backward product for the input
gradient run in fp8 through `torch._scaled_mm`; the frozen base has no weight gradient, so those two
are all its GEMMs. The LoRA path (hooks adding onto the layer's output, engine/lora/network.py,
in place by engine/lora/up_add.py) stays bf16 with float32 master weights, and convolutions and
attention stay as they are.

Design, and why:
- Format: e4m3 everywhere, gradients too. Every scale is computed from the tensor itself at the
  moment it is quantised (no delayed amax history), so e5m2's wider range buys nothing that the scale
  does not already give, while e4m3 keeps twice the precision (3 mantissa bits). torch's row-wise
  `_scaled_mm` also wants e4m3 on both sides (e5m2 only with CUDA 12.9+ on sm90).
- Granularity: row-wise. Activations and gradients get one scale per token row ([M, 1]), weights one
  per output row ([1, N]); that is `_scaled_mm`'s row-wise mode (bf16 output, bf16 bias fused).
  A per-tensor scale lets one outlier token (SD's activations have a few) push every other row
  into e4m3's subnormals; per row, each token and each output channel uses the format's full
  range. The weight's per-row scales lie along the backward's contracted dimension
  (dx = dy @ W sums over the output rows), where `_scaled_mm` has no scale, so the backward
  multiplies them into dy's columns as it quantises dy (the same kernel, no extra pass).
- Weights: a bf16 host weight gets an fp8 copy with per-row scales for the run (1 byte per weight;
  SD1.5's 184 Linear layers 0.25 GiB, SDXL's 743: 2.1 GiB), made when the run starts and dropped when it ends. A
  weight already stored in e4m3 (the engine's `fp8_base`, ComfyUI's `weight_dtype: fp8_e4m3fn`) is
  used as it is, with scale 1 or ComfyUI's `scale_weight`: no second copy.
- Backward layout: fp8 GEMMs need both operands contiguous along the summed dimension; dx = dy @ W
  sums over W's rows, so it needs W transposed. Each layer's backward transposes its fp8 weight
  (N*K bytes, a memory-bound copy) and drops it after the GEMM: SDXL's 2.1 GiB of fp8 weights once
  per step (a copy kernel per layer; estimated 1-3 ms per step on an H100, against 400+ ms for an SDXL
  batch-8 step) instead of holding a second 2.1 GiB copy for the whole run. `KEEP_TRANSPOSED = True` keeps a transposed copy instead; `python -m bench.fp8_gemms` times
  both next to the GEMMs.
- Activations are quantised by one Triton kernel on CUDA (engine/models/fp8_quant.py); under
  torch.compile by inductor, which fuses the quantisation into the ops before it.
- Small products stay in bf16: a layer called with fewer than `MIN_ROWS` token rows (the time and
  size embeddings, the text context's keys and values at small batches) runs the host's forward,
  where the extra quantisation kernels would cost more than the fp8 GEMM saves. So does any call
  without grad (previews sample as the host does), in another dtype, or with extra arguments.

The host's model is left bit-identical: layers are taken over by an instance `forward` that is
removed on exit (also after an exception), weights are read, never written. A ComfyUI Linear (comfy.ops:
casts its weight to the input's dtype per call) is taken over only while it has no weight or bias
patch functions (ComfyUI's LoRA-in-lowvram hooks); other Linear subclasses with their own
forward (A1111's Lora patches, quantised-tensor formats) are left alone. Works inside the
CUDA-graphed step (no host syncs: every scale is a device tensor; the Triton kernel is compiled in
the eager warm-up step) and under torch_compile.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .fp8 import Fp8BaseLinear, output_dtype
from .fp8_quant import E4M3, quantize_rows, quantize_rows_torch
from .module_state import instance_forwards

MIN_ROWS = 1024  # token rows below which a layer keeps its bf16 forward
FAST_ACCUM_FORWARD = True  # as torchao's float8 training: fast accumulation for the output,
FAST_ACCUM_BACKWARD = False  # full-precision accumulation for the gradient
KEEP_TRANSPOSED = False  # True: hold a transposed fp8 copy per layer instead of transposing in backward
ALLOW_CPU = False  # tests: the CPU runs the same code through torch's CPU _scaled_mm (slow, for checks)
_probed: dict[str, str | None] = {}


class Fp8Weight:
    """One layer's fp8 operands: `q` [N, K] e4m3, `scale` [1, N] (forward), `scale_in` [1, K] and
    `fold` [N] or None (backward: see the module doc), `bias` bf16, `q_t` [K, N] when kept."""

    def __init__(self, q, scale, scale_in, fold, bias, q_t, copied: bool):
        self.q, self.scale, self.scale_in, self.fold, self.bias, self.q_t = q, scale, scale_in, fold, bias, q_t
        self.copied = copied


class Fp8Linear(torch.autograd.Function):
    """`x @ W.t() + b` for a frozen W in fp8: forward and input gradient on fp8 tensor cores."""

    @staticmethod
    def forward(ctx, x, q, scale, scale_in, fold, bias, q_t):
        xq, xs = quantize_rows(x)
        out = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale, bias=bias, out_dtype=torch.bfloat16,
                               use_fast_accum=FAST_ACCUM_FORWARD)
        ctx.save_for_backward(q, scale_in, fold, q_t)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        q, scale_in, fold, q_t = ctx.saved_tensors
        gq, gs = quantize_rows(grad, fold)
        if q_t is None:
            q_t = q.t().contiguous()  # [K, N]: the summed dimension N contiguous
        dx = torch._scaled_mm(gq, q_t.t(), scale_a=gs, scale_b=scale_in, out_dtype=torch.bfloat16,
                              use_fast_accum=FAST_ACCUM_BACKWARD)
        return dx.to(ctx.x_dtype), None, None, None, None, None, None


def linear_fp8(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """The layer's output for `x` [..., K] in bf16. The reshapes stay outside the Function, so the
    output is a plain tensor that LoRA's in-place add may write into (engine/lora/up_add.py)."""
    out = Fp8Linear.apply(x.reshape(-1, x.shape[-1]), w.q, w.scale, w.scale_in, w.fold, w.bias, w.q_t)
    return out.view(*x.shape[:-1], out.shape[-1])


# --- which layers, and their fp8 weights ------------------------------------------------------------
def adoptable(layer: nn.Module, device: torch.device) -> bool:
    """A frozen Linear on `device` whose forward we know (torch's, or ComfyUI's casting one without
    patches), with a plain 2-D weight whose sizes suit the fp8 GEMM (multiples of 16)."""
    own = layer.__dict__.get("forward")  # an instance forward: only fp8_host's, the same product
    if not isinstance(layer, nn.Linear) or (own is not None and not getattr(own, "casts_fp8", False)):
        return False
    w, b = layer.weight, layer.bias
    if type(w) not in (nn.Parameter, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return False
    if not w.is_contiguous() or w.data_ptr() % 16:  # the fp8 GEMM reads it row-major, 16-byte aligned
        return False
    if w.requires_grad or (b is not None and b.requires_grad) or not _same_device(w.device, device):
        return False
    if w.shape[0] % 16 or w.shape[1] % 16 or _comfy_scale(layer) is False:
        return False
    torch_forward = getattr(type(layer).forward, "__module__", "") == "torch.nn.modules.linear"
    if torch_forward or type(layer) is Fp8BaseLinear:  # fp8_base's: the same product, its weight cast
        return True
    return _comfy_unpatched(layer)


def _comfy_unpatched(layer: nn.Module) -> bool:
    """ComfyUI's comfy.ops Linear (any of its op sets): weight and bias cast to the input's dtype,
    then the patch functions applied; with none, the product is F.linear of the stored weight."""
    if not callable(getattr(layer, "forward_comfy_cast_weights", None)):
        return False
    patches = (getattr(layer, "weight_function", None), getattr(layer, "bias_function", None))
    return all(isinstance(p, list) and not p for p in patches)


def _comfy_scale(layer: nn.Module):
    """ComfyUI's `scale_weight` of scaled-fp8 layers (the real weight is weight * scale_weight) as a
    0-d float32 tensor; None without one; False for a kind of scale we do not handle."""
    s = getattr(layer, "scale_weight", None)
    if s is None:
        return None
    if not isinstance(s, torch.Tensor) or s.numel() != 1:
        return False
    return s.detach().to(layer.weight.device, torch.float32).reshape(())


def fp8_weight(layer: nn.Linear, keep_transposed: bool = False) -> Fp8Weight:
    """The layer's fp8 operands: its own e4m3 weight where it has one, else a row-wise e4m3 copy."""
    w = layer.weight.detach()
    n, k = w.shape
    s = _comfy_scale(layer)
    with torch.no_grad():
        if w.dtype == E4M3:
            q, fold, copied = w, None, False
            one = s if s is not None else torch.ones((), dtype=torch.float32, device=w.device)
            scale, scale_in = one.expand(1, n).contiguous(), one.expand(1, k).contiguous()
        else:
            src = w.float() * s if s is not None else w
            q, rows = quantize_rows_torch(src)
            scale, fold, copied = rows.reshape(1, n), rows.reshape(n), True
            scale_in = torch.ones((1, k), dtype=torch.float32, device=w.device)
        bias = layer.bias.detach().to(torch.bfloat16) if layer.bias is not None else None
        q_t = q.t().contiguous() if keep_transposed else None
    return Fp8Weight(q, scale, scale_in, fold, bias, q_t, copied)


# --- when a call takes the fp8 path -----------------------------------------------------------------
def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are the same device when 0 is the current one."""
    if a.type != b.type or a.type != "cuda":
        return a.type == b.type
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def takes(x: torch.Tensor, w: Fp8Weight, min_rows: int) -> bool:
    """Whether this call runs in fp8 (decided from shapes and dtypes on the host: no sync)."""
    k = w.q.shape[1]
    return (torch.is_grad_enabled() and x.shape[-1] == k and x.numel() >= min_rows * k and x.device == w.q.device
            and x.dtype in (torch.bfloat16, torch.float32) and output_dtype(x) == torch.bfloat16)


# --- the switch ---------------------------------------------------------------------------------------
def unsupported_reason(device: torch.device, precision: str) -> str | None:
    """Why fp8_compute cannot run here, in one line, or None."""
    if precision != "bf16":
        return f"needs mixed_precision bf16 (the fp8 products write bf16; this run computes in {precision})"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"needs torch 2.4 or newer (this is {torch.__version__})"
    if device.type == "cpu" and not ALLOW_CPU:
        return ("needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: RTX 40xx, L40S, H100, "
                "B200); this run is on the CPU")
    if device.type == "cuda":
        if getattr(torch.version, "hip", None):
            return "runs on NVIDIA GPUs only (ROCm's fp8 formats differ)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: RTX 40xx, L40S, H100, "
                    f"B200); {torch.cuda.get_device_name(device)} has {major}.{minor}")
    elif device.type != "cpu":
        return f"runs on NVIDIA GPUs only, not on {device.type}"
    return _probe(device)


def _probe(device: torch.device) -> str | None:
    """One tiny row-wise product with a bias, as the layers run it: a torch build without that kernel
    says so here, before training, instead of in the first step."""
    key = str(device)
    if key not in _probed:
        try:
            a = torch.ones((16, 16), device=device).to(E4M3)
            one_m, one_n = torch.ones((16, 1), device=device), torch.ones((1, 16), device=device)
            bias = torch.zeros(16, device=device, dtype=torch.bfloat16)
            torch._scaled_mm(a, a.t(), scale_a=one_m, scale_b=one_n, bias=bias, out_dtype=torch.bfloat16)
            _probed[key] = None
        except Exception as exc:  # noqa: BLE001 - any failure means this torch/GPU cannot run it
            text = str(exc).strip().splitlines()
            first = text[0] if text else type(exc).__name__
            _probed[key] = f"torch {torch.__version__} cannot run row-wise fp8 products here ({first})"
    return _probed[key]


@contextlib.contextmanager
def fp8_compute(root: nn.Module | None, enabled: bool, device, precision: str,
                say: Callable[[str], None] | None = None, min_rows: int | None = None):
    """Run `root`'s large frozen Linear layers in fp8 for the duration (see the module doc); yields the
    number of layers taken over. Refused with a ConfigError, in one line, where fp8 cannot run."""
    if not enabled or root is None:
        yield 0
        return
    device = torch.device(device)
    why = unsupported_reason(device, precision)
    if why is not None:
        raise ConfigError(f"fp8_compute {why}. Turn fp8_compute off.")
    rows = MIN_ROWS if min_rows is None else min_rows
    layers = [m for m in root.modules() if adoptable(m, device)]
    weights = {id(m): fp8_weight(m, KEEP_TRANSPOSED) for m in layers}
    if say is not None:
        say(_summary(root, weights, rows))

    def take(mod):
        w = weights[id(mod)]

        def forward(x, *args, _own=mod.forward, **kwargs):
            if args or kwargs or not isinstance(x, torch.Tensor) or not takes(x, w, rows):
                return _own(x, *args, **kwargs)
            return linear_fp8(x, w)

        return forward

    try:
        with instance_forwards(layers, take) as n:
            yield n
    finally:
        weights.clear()


def _summary(root: nn.Module, weights: dict, rows: int) -> str:
    copied = [w for w in weights.values() if w.copied]
    extra = sum(w.q.numel() + (w.q_t.numel() if w.q_t is not None else 0) for w in weights.values()) \
        - sum(w.q.numel() for w in weights.values() if not w.copied)
    linears = sum(isinstance(m, nn.Linear) for m in root.modules())
    return (f"fp8_compute: {len(weights)} of {linears} Linear layers on fp8 tensor cores when called with "
            f"{rows}+ token rows ({len(weights) - len(copied)} on their stored fp8 weights, {len(copied)} with an "
            f"fp8 copy: {extra / 2**30:.2f} GiB)")
