"""Row-wise float8 (e4m3) quantisation of activations, gradients and weights, for fp8_compute.

`quantize_rows(x)` turns a 2-D tensor into `(q, scale)`: `q` in float8_e4m3fn, `scale` float32 of
shape [rows, 1], with `q * scale ~= x` row by row. Each row is scaled so that its largest magnitude
lands on e4m3's largest value (448), so every row uses the format's whole range whatever its
magnitude. `col_scale` (a [cols] float32 vector) multiplies the columns first: the backward folds the
weight's per-row scales into the gradient with it (engine/models/fp8_compute.py says why).

On CUDA, outside torch.compile, one Triton kernel reads each row once and writes its fp8 values and
scale (the same math as the torch ops below, operation for operation, so both give the same bits;
bench/fp8_check.py compares them on the GPU). The torch ops make several passes over the tensor in
eager mode, which at SDXL sizes would cost as much as the fp8 GEMM saves; under torch.compile
(inductor fuses them, also into the norm or add before them) and on the CPU (tests) they run as is.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
EPS = 1e-12  # an all-zero row gets this as its largest magnitude: q = 0, no division by zero

# torch.compiler.is_compiling arrived in torch 2.3
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
_kernel = None  # the Triton kernel, built at first use; False where Triton cannot be imported


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, scale)` of the 2-D tensor `x` (any float dtype), row-wise e4m3 (see the module doc)."""
    if x.is_cuda and not _compiling():
        kernel = _triton_kernel()
        if kernel:
            return _quantize_triton(kernel, x, col_scale)
    return quantize_rows_torch(x, col_scale)


def quantize_rows_torch(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference math in torch ops (what the Triton kernel computes)."""
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(EPS)
    top = torch.full_like(amax, E4M3_MAX)  # tensor / tensor: a true division, as the kernel's div_rn
    q = (xf * (top / amax)).to(E4M3)  # (a Python number over a tensor multiplies by its reciprocal)
    return q, amax / top


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of `(q, scale)` (tests and checks)."""
    return q.float() * scale


def _quantize_triton(kernel, x: torch.Tensor, col_scale: torch.Tensor | None):
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=E4M3, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = 1 << max(cols - 1, 0).bit_length()
        warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        mul = col_scale.contiguous() if col_scale is not None else x
        kernel[(rows,)](x, mul, q, scale, cols, HAS_MUL=col_scale is not None, BLOCK=block, num_warps=warps)
    return q, scale


def _triton_kernel():
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build_kernel()
        except Exception:  # noqa: BLE001 - no Triton (or one without fp8): the torch ops do the same
            _kernel = False
    return _kernel


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, mul_ptr, q_ptr, scale_ptr, n_cols, HAS_MUL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MUL:
            x = x * tl.load(mul_ptr + cols, mask=mask, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        q = (x * tl.div_rn(448.0, amax)).to(tl.float8e4nv)
        tl.store(q_ptr + row * n_cols + cols, q, mask=mask)
        tl.store(scale_ptr + row, tl.div_rn(amax, 448.0))

    return quantize_rows_kernel
