"""How fast the thin GEMMs of a rank-16 LoRA layer run on this GPU, at SDXL batch 8 shapes.

    python -m bench.lora_gemms

Each LoRA layer adds five GEMMs with one side of width `rank` (forward: down projection, up
projection added onto the base output; backward: the two weight gradients, the input gradient's two
halves) plus the add of its input gradient onto the base layer's. They move far more bytes than they
compute, so the figure that matters is bandwidth: each line prints the kernel's time and GB/s
(bytes of the large operands read and written), next to a plain copy of the same bytes. Variants
show whether another layout or an in-place form of the same product is faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANK = 16
# (name, tokens N, in, out) for SDXL at 1024, batch 8: 32x32 latents at the 1280-wide level, 64x64 at 640
LAYERS = [("attn 1280", 8 * 1024, 1280, 1280), ("ff.net.0.proj 1280", 8 * 1024, 1280, 10240),
          ("ff.net.2 1280", 8 * 1024, 5120, 1280), ("attn 640", 8 * 4096, 640, 640),
          ("ff.net.0.proj 640", 8 * 4096, 640, 5120)]


def timed(fn, iters: int = 50) -> float:
    """Mean time of one call in ms over `iters` calls after warm-up (CUDA events)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, n, d_in, d_out in LAYERS:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(n, d_in, device=dev, dtype=dt, generator=g)
        y = torch.randn(n, d_out, device=dev, dtype=dt, generator=g)
        dy = torch.randn(n, d_out, device=dev, dtype=dt, generator=g)
        dx = torch.randn(n, d_in, device=dev, dtype=dt, generator=g)
        down = torch.randn(RANK, d_in, device=dev, dtype=dt, generator=g)
        up = torch.randn(d_out, RANK, device=dev, dtype=dt, generator=g)
        up_t = up.t().contiguous()
        h = torch.randn(n, RANK, device=dev, dtype=dt, generator=g)
        e = 2  # bytes per element
        cases = [
            ("copy of out (reference)", lambda: y.clone(), 2 * n * d_out * e),
            ("fwd down   F.linear(x, down)", lambda: F.linear(x, down), n * d_in * e),
            ("fwd up     addmm(y, h, up.t())", lambda: torch.addmm(y, h, up.t(), alpha=0.5), 2 * n * d_out * e),
            ("fwd up     addmm(y, h, up_t contiguous)", lambda: torch.addmm(y, h, up_t, alpha=0.5), 2 * n * d_out * e),
            ("fwd up     y.addmm_(h, up.t()) in place", lambda: y.addmm_(h, up.t(), alpha=1e-3), 2 * n * d_out * e),
            ("fwd up     mm + add", lambda: y + torch.mm(h, up.t()), 4 * n * d_out * e),
            ("bwd dh     dy.mm(up)", lambda: dy.mm(up), n * d_out * e),
            ("bwd dh     (up.t() @ dy.t()).t()", lambda: torch.mm(up.t(), dy.t()).t(), n * d_out * e),
            ("bwd dup    dy.t().mm(h)", lambda: dy.t().mm(h), n * d_out * e),
            ("bwd dup    (h.t() @ dy).t()", lambda: torch.mm(h.t(), dy).t(), n * d_out * e),
            ("bwd ddown  h.t().mm(x)", lambda: h.t().mm(x), n * d_in * e),
            ("bwd dx     h.mm(down)", lambda: h.mm(down), n * d_in * e),
            ("bwd dx     + accumulate (autograd)", lambda: dx + h.mm(down), 4 * n * d_in * e),
            ("bwd dx     addmm(dx, h, down) fused", lambda: torch.addmm(dx, h, down), 2 * n * d_in * e),
            ("bwd dx     dx.addmm_(h, down) in place", lambda: dx.addmm_(h, down, alpha=1e-3), 2 * n * d_in * e),
        ]
        print(f"\n{name}: N={n}, in={d_in}, out={d_out}, rank {RANK}")
        for label, fn, nbytes in cases:
            ms = timed(fn)
            print(f"  {label:42s} {ms * 1000:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    main()
