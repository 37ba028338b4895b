"""Next-token loss without the full logits.

At 2048 tokens a 128k-word vocabulary makes logits of 2048 x 128256: 0.5 GiB in bf16, 1 GiB once
upcast to float32 for the softmax, and the same again for their gradient, all alive at once in the
usual `cross_entropy(lm_head(h).float(), labels)`. Here the rows go through the output projection a
chunk at a time; each chunk's loss and its gradient with respect to the hidden states are computed
together in the forward pass (the loss is the last node of the graph, so its gradient is known then,
as Liger's fused linear cross-entropy does), and only that gradient, [tokens, hidden] in float32, is
kept for backward. The frozen projection gets no gradient. The sum is divided by `denominator`, the number of
trained tokens in the whole optimizer step (across gradient accumulation), so every trained token
weighs the same however the tokens fall into micro-batches. No host sync, so it runs in a CUDA graph.
"""

from __future__ import annotations

import torch

from .packing import IGNORE

CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk (its softmax takes as much again)
# bf16 x bf16 -> float32 straight out of the GEMM (CUDA): no bf16 logits to round and upcast again
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32, accumulated and rounded once (where this PyTorch build's CUDA GEMM can)."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # decided at the first (eager) step, never in a graph
            _MM_OUT_DTYPE = False
    return (a @ b).float()


def chunk_rows(vocab: int) -> int:
    return max(64, (CHUNK_BYTES // (4 * vocab)) // 64 * 64)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator, softcap):
        rows = chunk_rows(weight.shape[0])
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = _mm_f32(h, weight.t())
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = t != IGNORE
            safe = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if want_grad:  # d loss / d logits = softmax - one-hot, per trained row, over the step's count
                probs = torch.softmax(logits, dim=-1)
                del logits
                probs.scatter_add_(1, safe[:, None], torch.full_like(probs[:, :1], -1.0))
                if softcap:
                    probs.mul_(1 - capped * capped)
                # the row mask goes on this [rows, H] product, not on [rows, V]; 1/count and the loss scale of
                # fp16 runs wait for backward, so a small gradient is not lost to fp16's range first
                grad[start:start + rows] = _mm_f32(probs.to(h.dtype), weight).mul_(valid[:, None])
        if want_grad:
            ctx.save_for_backward(grad, denominator)
            ctx.dtype = hidden.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad, denominator = ctx.saved_tensors
        return (grad * (grad_output.float() / denominator)).to(ctx.dtype), None, None, None, None


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor,
            softcap: float = 0.0) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over trained positions, divided by `denominator`.

    hidden [..., H] (the last layer's normalised output), weight [V, H] (the frozen output projection),
    targets [...] (token ids, IGNORE where nothing is trained), denominator a 0-d tensor."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedNLL.apply(flat, weight, targets.reshape(-1), denominator.to(torch.float32), float(softcap or 0))


def logits_loss(logits: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """The same loss from full logits, for models whose output layer is not a plain projection."""
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    return nll / denominator.to(torch.float32)
