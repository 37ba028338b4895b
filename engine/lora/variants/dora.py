"""DoRA (LyCORIS `dora_wd=True` on LoRA/LoCon): a LoRA whose merged weight is renormalised.

    W' = (W0 + s * up @ down) * (m / ||W0 + s * up @ down||),   s = alpha / rank,

with one magnitude `m` per INPUT channel: the norm is taken over the output rows (and a Conv2d's
kernel) of each input column, and `dora_scale` has shape [1, in] ([1, in, 1, 1] for a Conv2d).
That is the orientation both A1111 (network.py `apply_weight_decompose`, the only one it computes)
and ComfyUI 0.3.75 (weight_adapter/base.py `weight_decompose`, chosen because dora_scale.shape[0] is 1)
apply correctly. PEFT keeps one magnitude per output row, and so does LyCORIS by default
(`wd_on_output=True`); ComfyUI 0.3.75 computes that orientation's norm from W0 alone and A1111 not at
all, so those files would load differently in each host. `m` starts at ||W0||, so W' = W0 at first.
Both hosts add `strength * (W' - W0)`; so does the hook at its multiplier. The norm is not detached
(gradients flow through it, as in LyCORIS); LyCORIS ignores network_dropout for DoRA, here it is refused.

Scaling input channels of a weight is scaling the input, so the hook needs no merged weight:

    W' x - W0 x = W0 ((g - 1) * x) + s * up(down(g * x)),   g = m / ||W0 + s * up @ down||,

one extra product with the frozen W0 (the only cost DoRA adds to LoRA, in forward and backward) and
LoRA's two thin ones, both added into the base output in place (engine/lora/up_add.py). The column
norms come without materialising W0 + s*up@down: ||.||^2 = ||W0||^2 (computed once, float64) +
2s <W0, up@down> + s^2 ||up@down||^2, from [rank x in] products; g is kept in float32, so g - 1 (the
part that moves the weight) keeps its precision in bf16 runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..network import LoRAModule, _fit, step_weights
from ..up_add import add_up
from .weight_delta import no_dropout


def host_weight(base: nn.Module, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """The base layer's effective weight, detached (a scaled-fp8 ComfyUI layer's times its scale_weight)."""
    w = base.weight.detach()
    w = w.to(device=device if device is not None else w.device, dtype=dtype or torch.float32)
    scale = getattr(base, "scale_weight", None)
    return w * scale.detach().to(w.device, w.dtype) if isinstance(scale, torch.Tensor) else w


class DoRAModule(LoRAModule):
    kind = "dora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        no_dropout(self.kind, dropout)
        if getattr(base, "weight", None) is None:  # A1111's stand-ins for OpenCLIP's fused attention
            raise ConfigError("network_type dora needs each layer's weight, and this host trains OpenCLIP's fused "
                              "text-encoder attention (SD2, SDXL's second encoder) through weightless stand-ins; "
                              "train DoRA with train_text_encoder off here, or use LoRA/LoHa/LoKr.")
        super().__init__(base, rank, alpha)
        self._host = (base,)  # a tuple: the host layer must not become a submodule (its weight is not ours)
        self.conv_args = (base.stride, base.padding, base.dilation) if self.is_conv else ()
        w = host_weight(base, torch.float64)
        col_sq = w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(1)
        self.register_buffer("_col_sq", col_sq.float(), persistent=False)  # ||W0||^2 per input channel
        self.magnitude_shape = (1, w.shape[1], *([1] * (w.dim() - 2)))
        # m = ||W0|| from the same float32 numbers the norm is computed from: g is exactly 1 at first
        self.dora_scale = nn.Parameter(self._col_sq.sqrt().reshape(self.magnitude_shape))

    # --- the update ------------------------------------------------------------------------------------
    def _gain(self, up_c: torch.Tensor, w0_c: torch.Tensor) -> torch.Tensor:
        """g = m / ||W0 + s up@down|| per input channel, float32 [in]; `up_c`, `w0_c` in the compute dtype."""
        s = self._scale
        down = self.lora_down.weight.float().flatten(1)  # [r, in*k]
        up = self.lora_up.weight.float().flatten(1)  # [out, r]
        cols = w0_c.shape[1]
        w0_up = (up_c.flatten(1).t() @ w0_c.flatten(1)).float()  # [r, in*k]
        cross = (down * w0_up).sum(0).reshape(cols, -1).sum(1)
        sq = (down * ((up.t() @ up) @ down)).sum(0).reshape(cols, -1).sum(1)
        norm = (self._col_sq + (2 * s) * cross + (s * s) * sq).clamp_min(1e-30).sqrt()
        return self.dora_scale.reshape(-1) / norm

    def apply_to(self, x: torch.Tensor, output: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        dtype = output.dtype
        down_w, up_w = step_weights(self, dtype)
        w0 = host_weight(self._host[0], dtype, output.device)
        gain = self._gain(up_w, w0)
        mult = self.multiplier
        x = x.to(dtype)
        if self.is_conv:
            view = (1, -1, 1, 1)
            moved = F.conv2d(x * ((gain - 1) * mult).to(dtype).view(view), w0, None, *self.conv_args)
            h = F.conv2d(x * gain.to(dtype).view(view), down_w, None, *self.conv_args)
            return output.add(moved).add(F.conv2d(h, up_w), alpha=mult * self._scale)
        h = F.linear(x * gain.to(dtype), down_w)
        if not output.is_contiguous() or output.dim() < 2:
            moved = F.linear(x * ((gain - 1) * mult).to(dtype), w0)
            return output.add(moved).add(F.linear(h, up_w), alpha=mult * self._scale)
        output = add_up(output, x * ((gain - 1) * mult).to(dtype), w0, 1.0, in_place)
        return add_up(output, h, up_w, mult * self._scale, in_place)

    # --- the shared interface --------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """W' - W0 in float32, computed the way the hosts compute it (merge, column norms, rescale)."""
        w0 = host_weight(self._host[0], torch.float32)
        merged = w0 + super().delta_weight()
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        return merged * (self.dora_scale.float().reshape(-1) / norm).reshape(self.magnitude_shape) - w0

    def fits(self, parts: dict[str, torch.Tensor]) -> bool:
        scale = parts.get("dora_scale")
        return super().fits(parts) and scale is not None and _fit(scale, self.dora_scale.shape).shape == \
            self.dora_scale.shape

    @classmethod
    def like_file(cls, base: nn.Module, parts: dict[str, torch.Tensor], template: "DoRAModule") -> "DoRAModule":
        module = super().like_file(base, parts, template)
        scale = parts.get("dora_scale")
        if scale is not None and _fit(scale, module.dora_scale.shape).shape != module.dora_scale.shape:
            raise ValueError(f"the file's dora_scale has shape {tuple(scale.shape)}: a magnitude per output "
                             f"channel (LyCORIS wd_on_output=True), which this trainer does not continue; "
                             f"it trains and reads DoRA with one per input channel {tuple(module.dora_scale.shape)}")
        return module

    def load_parts(self, parts: dict[str, torch.Tensor], key: str) -> set[str]:
        used = super().load_parts(parts, key)
        scale = parts.get("dora_scale")
        if scale is None or _fit(scale, self.dora_scale.shape).shape != self.dora_scale.shape:
            raise ValueError(f"{key}: a DoRA module needs dora_scale of shape {tuple(self.dora_scale.shape)} "
                             f"(one magnitude per input channel); the file has "
                             f"{None if scale is None else tuple(scale.shape)}")
        with torch.no_grad():
            self.dora_scale.copy_(_fit(scale, self.dora_scale.shape))
        return used | {"dora_scale"}
