"""LoHa (LyCORIS `algo=loha`): the update is the Hadamard product of two low-rank matrices,

    dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank,

which can reach rank r**2 with the parameters of two rank-r LoRAs. File keys as LyCORIS writes them and
ComfyUI (comfy/weight_adapter/loha.py) and A1111 (extensions-builtin/Lora/network_hada.py) read
them: `hada_w1_a` [out, r], `hada_w1_b` [r, in] (a Conv2d's flattened to [r, in*kh*kw]), the same
for `hada_w2_*`, and `alpha`. Initialised as LyCORIS does: w1_b and w2_b ~ N(0, 1), w1_a ~ N(0, 0.1),
w2_a = 0, so the update starts at exactly zero and w2_a gets the first gradients. LyCORIS' Tucker
form for 3x3 kernels (`hada_t1`/`hada_t2`, use_tucker) is not made.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .weight_delta import WeightDeltaModule, no_dropout


class LoHaModule(WeightDeltaModule):
    kind = "loha"
    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    zero_factor = "hada_w2_a"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        no_dropout(self.kind, dropout)
        super().__init__(base, rank, alpha)
        out_dim, in_dim = self.shape[0], math.prod(self.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def _delta(self, factors: list[torch.Tensor]) -> torch.Tensor:
        w1a, w1b, w2a, w2b = factors
        return (w1a @ w1b) * (w2a @ w2b)

    @classmethod
    def like_file(cls, base: nn.Module, parts: dict[str, torch.Tensor], template: "LoHaModule") -> "LoHaModule":
        rank = int(parts["hada_w1_b"].shape[0])
        return cls(base, rank, float(parts.get("alpha", rank)))

