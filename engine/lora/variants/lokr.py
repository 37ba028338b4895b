"""LoKr (LyCORIS `algo=lokr`): the update is a Kronecker product of a small and a larger matrix,

    dW = kron(w1, w2) * scale,   w1: [a, c],  w2: [b, d] (a Conv2d's: [b, d, kh, kw]),  out = a*b, in = c*d.

Each side is split as LyCORIS splits it (`factorization` below): into the divisor pair closest to a
square, or with `factor` > 0 into (factor, dim/factor). w2 is low-rank (`lokr_w2_a` [b, r] @
`lokr_w2_b` [r, d], a Conv2d's [r, d*kh*kw]) when the rank is below half its larger side, else a full
`lokr_w2`; w1 is low-rank (`lokr_w1_a`/`lokr_w1_b`) only with `decompose_both`; `full_matrix` keeps
both full. The scale is alpha/rank when a side is low-rank and 1 when both are full (LyCORIS then
stores alpha = rank; ComfyUI and A1111 ignore alpha for such a file). Initialised as LyCORIS does:
w1 (or w1_a, w1_b) kaiming-uniform, the full w2 or w2_b zero, w2_a kaiming-uniform, so the update
starts at exactly zero. Keys as ComfyUI (comfy/weight_adapter/lokr.py) and A1111
(extensions-builtin/Lora/network_lokr.py) read them; LyCORIS' Tucker form (`lokr_t2`) is not made.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..network import _fit
from .weight_delta import WeightDeltaModule, layer_geometry, no_dropout

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """`dim` as (m, n) with m <= n, m * n = dim, as LyCORIS splits a LoKr side.

    A `factor` > 0 that divides `dim` is taken as one side. Otherwise LyCORIS walks up the divisors of
    `dim` (none above `factor` when it is > 0) and stops at the first one at or past sqrt(dim): the
    result is the divisor pair closest to a square, or the largest divisor allowed below it
    (512 -> (16, 32); 360 -> (18, 20); 128 with factor 4 -> (4, 32); a prime p -> (1, p))."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = dim if factor <= 0 else factor
    small = [d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0]
    if dim // small[-1] <= limit:  # the walk reaches the first divisor at or past sqrt(dim)
        return small[-1], dim // small[-1]
    m = max(d for d in small if d <= limit)
    return m, dim // m


class LoKrModule(WeightDeltaModule):
    kind = "lokr"
    factor_names = NAMES

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, factor: int = -1,
                 decompose_both: bool = False, full_matrix: bool = False, layout: tuple | None = None):
        """`layout` = ((a, b), (c, d), w1 low-rank, w2 low-rank) overrides the split (reading a file)."""
        no_dropout(self.kind, dropout)
        super().__init__(base, rank, alpha)
        self.options = {"factor": factor, "decompose_both": decompose_both, "full_matrix": full_matrix}
        out_dim, in_dim, kernel = self.shape[0], self.shape[1], tuple(self.shape[2:])
        if layout is None:
            (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
            w1_low = decompose_both and rank < max(a, c) / 2 and not full_matrix
            w2_low = rank < max(b, d) / 2 and not full_matrix
        else:
            (a, b), (c, d), w1_low, w2_low = layout
        self.split = ((a, b), (c, d))
        if w1_low:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if w2_low:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))
        self.low_rank = (w1_low, w2_low)
        self.zero_factor = "lokr_w2_b" if w2_low else "lokr_w2"
        if not (w1_low or w2_low):
            self.alpha.fill_(float(rank))  # scale 1, stored as LyCORIS stores it
        self._scale = self._scale_for(float(self.alpha))

    def _scale_for(self, alpha: float) -> float:
        return alpha / self.rank if any(self.low_rank) else 1.0

    def cast_sources(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in NAMES if n in self._parameters]

    def _delta(self, factors: list[torch.Tensor]) -> torch.Tensor:
        f = dict(zip([n for n in NAMES if n in self._parameters], factors))
        w1 = f["lokr_w1_a"] @ f["lokr_w1_b"] if self.low_rank[0] else f["lokr_w1"]
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"] if self.low_rank[1] else f["lokr_w2"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def fits(self, parts: dict[str, torch.Tensor]) -> bool:
        own = {k: v for k, v in self.state_dict().items() if k != "alpha"}
        return set(own) == set(parts) - {"alpha"} and all(_fit(parts[k], v.shape).shape == v.shape
                                                          for k, v in own.items())

    def load_parts(self, parts: dict[str, torch.Tensor], key: str) -> set[str]:
        shapes = {k: v.shape for k, v in self.state_dict().items() if k != "alpha"}
        return super().load_parts({k: _fit(v, shapes[k]) if k in shapes else v for k, v in parts.items()}, key)

    @classmethod
    def like_file(cls, base: nn.Module, parts: dict[str, torch.Tensor], template: "LoKrModule") -> "LoKrModule":
        """The split and low-rank sides a LyCORIS/our file uses, read from its tensors' shapes."""
        w1_low, w2_low = "lokr_w1" not in parts, "lokr_w2" not in parts
        a, c = (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1]) if w1_low else parts["lokr_w1"].shape[:2]
        b = (parts["lokr_w2_a"] if w2_low else parts["lokr_w2"]).shape[0]
        rank = int(parts["lokr_w1_b"].shape[0] if w1_low else parts["lokr_w2_b"].shape[0] if w2_low
                   else template.rank)
        out_dim, in_dim = layer_geometry(base)[0][:2]
        if in_dim % c or out_dim != a * b:
            raise ValueError(f"the file's LoKr factors ({a}x{c}, {b}x...) do not fit a {out_dim}x{in_dim} layer")
        return cls(base, rank, float(parts.get("alpha", rank)), **template.options,
                   layout=((int(a), int(b)), (int(c), in_dim // int(c)), w1_low, w2_low))
