"""LoRA modules attached to a host's layers with forward hooks.

A hook adds `up(down(x)) * multiplier * alpha/rank` to a Linear/Conv2d output. Hooks leave the host's
module tree, state-dict keys, weights and `forward` methods untouched (the hosts patch `forward`
themselves: ComfyUI's weight functions, A1111's Lora extension), compose with gradient
checkpointing, and are removed without a trace by `detach()`. A Linear's hook adds into the output it
receives when it is the module's only hook (nothing else has seen that tensor): up_add.py.

The network's own state dict already has kohya's layout:
`lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .up_add import add_up


class LoRAModule(nn.Module):
    """The low-rank delta of one base layer, initialised as kohya does (kaiming down, zero up)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("grouped convolutions cannot carry LoRA")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            self.is_conv = True
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
            self.is_conv = False
        else:
            raise TypeError(f"LoRA needs a Linear or Conv2d layer, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.dropout = dropout
        self.multiplier = 1.0
        self._scale = float(alpha) / rank  # kept host-side: reading the buffer would sync the GPU
        self._cast: tuple[torch.Tensor, torch.Tensor] | None = None  # (down, up) in the compute dtype

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self._scale = float(alpha) / self.rank

    def apply_to(self, x: torch.Tensor, output: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """`output + delta(x)` in the output's dtype with as few kernels as possible: the down/up
        weights come from the per-step cast cache when there is one, the scale rides on the
        final GEMM (Linear: one addmm) or on the add (Conv2d), so no separate multiply or cast.
        `in_place`: nothing else holds `output`, so a Linear's up projection may be added into it
        (engine/lora/up_add.py)."""
        dtype = output.dtype
        cached = self._cast
        if cached is not None and cached[0].dtype == dtype:
            down_w, up_w = cached
        else:
            down_w, up_w = self.lora_down.weight.to(dtype), self.lora_up.weight.to(dtype)
        scale = self.multiplier * self._scale
        x = x.to(dtype)
        if self.is_conv:
            d = self.lora_down
            h = F.conv2d(x, down_w, None, d.stride, d.padding, d.dilation)
            if self.dropout and self.training:
                h = F.dropout(h, p=self.dropout)
            return output.add(F.conv2d(h, up_w), alpha=scale)
        h = F.linear(x, down_w)
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        if not output.is_contiguous() or output.dim() < 2:
            return output.add(F.linear(h, up_w), alpha=scale)
        return add_up(output, h, up_w, scale, in_place)


def cast_together(weights: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """`[w.to(dtype) for w in weights]`, the same values and gradients, in a few kernels instead of one
    cast per weight forward and another per gradient backward: the weights of each device are
    concatenated, cast once and split into views (backward gathers their gradients the same way).
    An SDXL network has 1444 LoRA weights; each tiny cast costs a few microseconds of GPU time even
    inside a CUDA graph, about a tenth of a batch-1 step."""
    out: list[torch.Tensor | None] = [None] * len(weights)
    groups: dict[torch.device, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.device, []).append(i)
    for idx in groups.values():
        flat = torch.cat([weights[i].reshape(-1) for i in idx]).to(dtype)
        for i, part in zip(idx, flat.split([weights[i].numel() for i in idx])):
            out[i] = part.view(weights[i].shape)
    return out


class LoRANetwork(nn.Module):
    """All LoRA modules of one run, keyed by kohya module name, plus the hooks that apply them."""

    def __init__(self):
        super().__init__()
        self.loras = nn.ModuleDict()
        self._bases: dict[str, nn.Module] = {}  # not submodules: the base weights stay out of our state dict
        self._handles: list = []
        self.te_keys: set[str] = set()
        self.aliases: dict[str, str] = {}  # every name a file may use for a module -> its kohya key
        self.conv_shaped: set[str] = set()  # Linear-based modules saved with 1x1-conv shapes (see add)
        # engine options (EngineOptions): benchmarks turn these off to measure what each buys
        self.up_in_place = True  # a lone Linear hook adds its up projection into the output (up_add.py)
        self.cast_together = True  # cast_weights casts all weights in a few kernels (cast_together)

    def add(self, key: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
            text_encoder: bool = False, aliases: tuple[str, ...] = (), conv_shaped: bool = False) -> LoRAModule:
        """`conv_shaped`: save this Linear module's weights as [r,in,1,1]/[out,r,1,1], where kohya's
        model has a 1x1 conv at that place (SD2's proj_in/proj_out)."""
        if key in self.loras:
            raise ValueError(f"duplicate LoRA module name {key}")
        module = LoRAModule(base, rank, alpha, dropout)
        self.loras[key] = module
        self._bases[key] = base
        if text_encoder:
            self.te_keys.add(key)
        if conv_shaped:
            self.conv_shaped.add(key)
        for alias in (key, *aliases):
            self.aliases[alias] = key
        return module

    def resize(self, key: str, rank: int, alpha: float) -> None:
        """Rebuild one module at another rank (continuing from a file trained with other ranks)."""
        old = self.loras[key]
        self.loras[key] = LoRAModule(self._bases[key], rank, alpha, old.dropout)

    def __len__(self) -> int:
        return len(self.loras)

    # --- hooks ------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        in_place = self.up_in_place
        for key, base in self._bases.items():
            lora = self.loras[key]

            def hook(module, args, output, lora=lora):
                # in place only when ours is the module's one hook: no other hook has seen `output`
                alone = in_place and len(module._forward_hooks) == 1 and not _global_forward_hooks
                return lora.apply_to(args[0], output, in_place=alone)

            self._handles.append(base.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def applied(self, multiplier: float | None = None):
        """Attach for the duration of a block (previews, tests), restoring the previous state."""
        was_attached, previous = self.attached, self.multiplier
        if multiplier is not None:
            self.set_multiplier(multiplier)
        self.attach()
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()
            self.set_multiplier(previous)

    @contextlib.contextmanager
    def cast_weights(self, dtype: torch.dtype | None):
        """Cast every LoRA weight to the compute dtype once for a whole training step (forward,
        gradient-checkpoint recompute and backward), instead of twice per layer per forward.
        The casts stay in the autograd graph, so gradients still reach the float32 weights."""
        if dtype is None or not self.loras:
            yield
            return
        try:
            loras = list(self.loras.values())
            weights = [w for lora in loras for w in (lora.lora_down.weight, lora.lora_up.weight)]
            casts = cast_together(weights, dtype) if self.cast_together else [w.to(dtype) for w in weights]
            for lora, down, up in zip(loras, casts[0::2], casts[1::2]):
                lora._cast = (down, up)
            yield
        finally:
            for lora in self.loras.values():
                lora._cast = None

    # --- weights ------------------------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        first = next(iter(self.loras.values()), None)
        return first.multiplier if first is not None else 1.0

    def set_multiplier(self, value: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = float(value)

    def unet_parameters(self) -> list[nn.Parameter]:
        return [p for k, m in self.loras.items() if k not in self.te_keys for p in m.parameters()]

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return [p for k, m in self.loras.items() if k in self.te_keys for p in m.parameters()]

    def kohya_state_dict(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        """Detached CPU tensors under kohya keys; `alpha` is saved in the same dtype, as kohya does."""
        out = {}
        for key, tensor in self.state_dict().items():
            name = key[len("loras."):]
            t = tensor.detach().to("cpu")
            if t.dim() == 2 and name.split(".", 1)[0] in self.conv_shaped:
                t = t[:, :, None, None]
            out[name] = t.to(dtype) if dtype is not None else t.clone()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy matching tensors in; returns (modules loaded, file keys that matched nothing)."""
        loaded, unused = [], []
        seen = set()
        for key, module in self.loras.items():
            down, up = sd.get(f"{key}.lora_down.weight"), sd.get(f"{key}.lora_up.weight")
            if down is None or up is None:
                continue
            down, up = _fit(down, module.lora_down.weight.shape), _fit(up, module.lora_up.weight.shape)
            if down.shape != module.lora_down.weight.shape or up.shape != module.lora_up.weight.shape:
                raise ValueError(f"{key}: the file has rank {down.shape[0]} with shapes {tuple(down.shape)}/"
                                 f"{tuple(up.shape)}, the network expects {tuple(module.lora_down.weight.shape)}/"
                                 f"{tuple(module.lora_up.weight.shape)}; set lora_rank to the file's rank")
            with torch.no_grad():
                module.lora_down.weight.copy_(down)
                module.lora_up.weight.copy_(up)
                alpha = sd.get(f"{key}.alpha")
                module.set_alpha(float(alpha) if alpha is not None else module.rank)
            loaded.append(key)
            seen.update({f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"})
        unused = sorted(k for k in sd if k not in seen)
        return loaded, unused


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A 1x1-conv weight [o,i,1,1] and a Linear weight [o,i] hold the same numbers; files use either
    for SD2's proj_in/proj_out (kohya: conv from single-file checkpoints, Linear from diffusers folders)."""
    def core(s):
        return tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)

    if tensor.shape != shape and core(tensor.shape) == core(shape):
        return tensor.reshape(shape)
    return tensor
