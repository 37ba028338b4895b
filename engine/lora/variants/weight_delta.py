"""The common part of LoHa and LoKr: an update built as a whole weight from small factors.

LoRA adds `up(down(x))`, two thin products. LoHa's update is a Hadamard product of two low-rank
matrices and LoKr's a Kronecker product; neither factors into thin products, so the update is built as
one weight `dW` (the shape of the base layer's weight) and applied as `x @ dW.t()` (a Conv2d: one
convolution with `dW`), which is also how LyCORIS trains them outside its bypass mode. A Linear's
product is added into the base layer's output in place (engine/lora/up_add.py, with `x` as the
"down" output and `dW` as the "up" weight); the factors are cast once per step with every other
LoRA weight (`LoRANetwork.cast_weights`), so the CUDA-graphed step covers these modules as it
covers LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..network import step_weights
from ..up_add import add_up


def layer_geometry(base: nn.Module) -> tuple[tuple[int, ...], bool]:
    """(weight shape, is_conv) of a Linear or Conv2d base layer, with a message for anything else."""
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError("grouped convolutions cannot carry LoRA")
        return (base.out_channels, base.in_channels, *base.kernel_size), True
    if isinstance(base, nn.Linear):
        return (base.out_features, base.in_features), False
    raise TypeError(f"LoRA needs a Linear or Conv2d layer, got {type(base).__name__}")


def no_dropout(kind: str, dropout: float) -> None:
    if dropout:
        raise ConfigError(f"lora_dropout is for LoRA/LoCon; network_type {kind} has no dropout (LyCORIS "
                          f"implements none for LoHa/LoKr and ignores it for DoRA). Set lora_dropout: 0.")


class WeightDeltaModule(nn.Module):
    """Base of the modules whose update is a whole weight. Subclasses define `factor_names` (their
    parameters, in file order), `zero_factor` and `_delta(factors)`: the update, unscaled, from those factors."""

    kind = ""
    factor_names: tuple[str, ...] = ()
    zero_factor = ""  # the factor initialised to zero (the change check watches it)

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.shape, self.is_conv = layer_geometry(base)
        self.conv_args = (base.stride, base.padding, base.dilation) if self.is_conv else ()
        self.rank = rank
        self.dropout = 0.0
        self.multiplier = 1.0
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._scale = float(alpha) / rank
        self._cast: tuple[torch.Tensor, ...] | None = None

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self._scale = self._scale_for(float(alpha))

    def _scale_for(self, alpha: float) -> float:
        return alpha / self.rank

    def _delta(self, factors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # --- the shared interface (see engine/lora/network.py) -------------------------------------------
    def zero_start(self) -> torch.Tensor:
        return getattr(self, self.zero_factor)

    def cast_sources(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.factor_names if getattr(self, name, None) is not None]

    def delta_weight(self) -> torch.Tensor:
        return self._delta([w.float() for w in self.cast_sources()]).reshape(self.shape) * self._scale

    def apply_to(self, x: torch.Tensor, output: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        dtype = output.dtype
        delta = self._delta(list(step_weights(self, dtype)))
        scale = self.multiplier * self._scale
        x = x.to(dtype)
        if self.is_conv:
            return output.add(F.conv2d(x, delta.reshape(self.shape), None, *self.conv_args), alpha=scale)
        if not output.is_contiguous() or output.dim() < 2:
            return output.add(F.linear(x, delta), alpha=scale)
        return add_up(output, x, delta, scale, in_place)

    def fits(self, parts: dict[str, torch.Tensor]) -> bool:
        own = {k: v for k, v in self.state_dict().items() if k != "alpha"}
        return set(own) == set(parts) - {"alpha"} and all(parts[k].shape == v.shape for k, v in own.items())

    def load_parts(self, parts: dict[str, torch.Tensor], key: str) -> set[str]:
        own = {k: v for k, v in self.state_dict().items() if k != "alpha"}
        if not self.fits(parts):
            have = {k: tuple(v.shape) for k, v in parts.items() if k != "alpha"}
            want = {k: tuple(v.shape) for k, v in own.items()}
            raise ValueError(f"{key}: the file's {self.kind} tensors {have} do not match this network's {want}; "
                             f"set lora_rank (and for LoKr factor / decompose_both) to the file's values")
        with torch.no_grad():
            for name in own:
                getattr(self, name).copy_(parts[name])
            alpha = parts.get("alpha")
            self.set_alpha(float(alpha) if alpha is not None else self.rank)
        return set(own) | {"alpha"}
