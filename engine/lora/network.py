"""LoRA modules attached to a host's layers with forward hooks.

A hook adds `up(down(x)) * multiplier * alpha/rank` to a Linear/Conv2d output. Hooks leave the host's
module tree, state-dict keys, weights and `forward` methods untouched (the hosts patch `forward`
themselves: ComfyUI's weight functions, A1111's Lora extension), compose with gradient
checkpointing, and are removed without a trace by `detach()`. A Linear's hook adds into the output it
receives when it is the module's only hook (nothing else has seen that tensor): up_add.py.

The network's own state dict already has the file layout: kohya's
`lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` for LoRA, LyCORIS' names for the
variants (engine/lora/variants/: LoHa, LoKr, DoRA). Every module kind has the same small interface:
`apply_to` (the hook's work), `cast_sources` (the weights the step casts at once), `delta_weight` (the
closed-form weight update a loader adds), `load_parts`/`fits`/`like_file` (reading a file back).
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

    kind = "lora"

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
        self._cast: tuple[torch.Tensor, ...] | None = None  # cast_sources() in the compute dtype

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self._scale = float(alpha) / self.rank

    # --- the interface every module kind shares (engine/lora/variants/) -----------------------------
    def zero_start(self) -> torch.Tensor:
        """The weight that starts at zero and moves once the module gets a gradient (the change check)."""
        return self.lora_up.weight

    def cast_sources(self) -> list[torch.Tensor]:
        """The weights `LoRANetwork.cast_weights` casts once per step; `_cast` then holds them in order."""
        return [self.lora_down.weight, self.lora_up.weight]

    def delta_weight(self) -> torch.Tensor:
        """The weight update a loader adds at strength 1 (float32, the base weight's shape)."""
        down, up = self.lora_down.weight.float(), self.lora_up.weight.float()
        shape = (up.shape[0], *down.shape[1:])
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * self._scale

    def fits(self, parts: dict[str, torch.Tensor]) -> bool:
        """True when a file's tensors for this module (suffix -> tensor) have this module's shapes."""
        own = self.state_dict()
        return all(k in parts and _fit(parts[k], own[k].shape).shape == own[k].shape
                   for k in ("lora_down.weight", "lora_up.weight"))

    @classmethod
    def like_file(cls, base: nn.Module, parts: dict[str, torch.Tensor], template: "LoRAModule") -> "LoRAModule":
        """A module for `base` shaped as a file's tensors say (another rank), else like `template`."""
        rank = int(parts["lora_down.weight"].shape[0])
        return cls(base, rank, float(parts.get("alpha", rank)), template.dropout)

    def load_parts(self, parts: dict[str, torch.Tensor], key: str) -> set[str]:
        """Copy a file's tensors in (a missing alpha means alpha = rank); returns the suffixes used."""
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise ValueError(f"{key}: the file has {sorted(parts)} but a LoRA module needs lora_down and lora_up")
        down, up = _fit(down, self.lora_down.weight.shape), _fit(up, self.lora_up.weight.shape)
        if down.shape != self.lora_down.weight.shape or up.shape != self.lora_up.weight.shape:
            raise ValueError(f"{key}: the file has rank {down.shape[0]} with shapes {tuple(down.shape)}/"
                             f"{tuple(up.shape)}, the network expects {tuple(self.lora_down.weight.shape)}/"
                             f"{tuple(self.lora_up.weight.shape)}; set lora_rank to the file's rank")
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
            alpha = parts.get("alpha")
            self.set_alpha(float(alpha) if alpha is not None else self.rank)
        return {"lora_down.weight", "lora_up.weight", "alpha"}

    def apply_to(self, x: torch.Tensor, output: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """`output + delta(x)` in the output's dtype with as few kernels as possible: the down/up
        weights come from the per-step cast cache when there is one, the scale rides on the
        final GEMM (Linear: one addmm) or on the add (Conv2d), so no separate multiply or cast.
        `in_place`: nothing else holds `output`, so a Linear's up projection may be added into it
        (engine/lora/up_add.py)."""
        dtype = output.dtype
        down_w, up_w = step_weights(self, dtype)
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


def step_weights(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A module's `cast_sources()` in `dtype`: the step's one cast (`cast_weights`) when there is one."""
    cached = module._cast
    if cached is not None and cached[0].dtype == dtype:
        return cached
    return tuple(w.to(dtype) for w in module.cast_sources())


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
            text_encoder: bool = False, aliases: tuple[str, ...] = (), conv_shaped: bool = False,
            factory=LoRAModule) -> nn.Module:
        """`conv_shaped`: save this Linear module's weights as [r,in,1,1]/[out,r,1,1], where kohya's
        model has a 1x1 conv at that place (SD2's proj_in/proj_out). `factory(base, rank, alpha,
        dropout)` makes the module: LoRAModule, or a variant's (engine/lora/variants/)."""
        if key in self.loras:
            raise ValueError(f"duplicate LoRA module name {key}")
        module = factory(base, rank, alpha, dropout)
        self.loras[key] = module
        self._bases[key] = base
        if text_encoder:
            self.te_keys.add(key)
        if conv_shaped:
            self.conv_shaped.add(key)
        for alias in (key, *aliases):
            self.aliases[alias] = key
        return module

    def match_file(self, sd: dict[str, torch.Tensor]) -> None:
        """Rebuild each module whose shapes differ from a file's (continuing from a file trained with
        other ranks, or another LoKr factorisation): `sd` is the file under this network's keys."""
        for key, parts in _by_module(sd).items():
            module = self.loras[key] if key in self.loras else None
            if module is not None and set(parts) - {"alpha"} and not module.fits(parts):
                self.loras[key] = type(module).like_file(self._bases[key], parts, module)

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
            sources = [lora.cast_sources() for lora in loras]
            weights = [w for ws in sources for w in ws]
            casts = iter(cast_together(weights, dtype) if self.cast_together else [w.to(dtype) for w in weights])
            for lora, ws in zip(loras, sources):
                lora._cast = tuple(next(casts) for _ in ws)
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
            if t.dim() == 2 and name.endswith(_CONV_SHAPED_PARTS) and name.split(".", 1)[0] in self.conv_shaped:
                t = t[:, :, None, None]
            # DoRA's magnitude stays float32: an fp16 one would move every weight by ~1e-4 of itself
            out[name] = t.to(dtype) if dtype is not None and not name.endswith(".dora_scale") else t.clone()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy matching tensors in; returns (modules loaded, file keys that matched nothing)."""
        loaded, seen = [], set()
        for key, parts in _by_module(sd).items():
            module = self.loras[key] if key in self.loras else None
            if module is None or not set(parts) - {"alpha"}:
                continue
            used = module.load_parts(parts, key)
            loaded.append(key)
            seen.update(f"{key}.{suffix}" for suffix in used if suffix in parts)
        unused = sorted(k for k in sd if k not in seen)
        return loaded, unused


_CONV_SHAPED_PARTS = (".lora_down.weight", ".lora_up.weight")  # a variant's other tensors keep their shapes


def _by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"lora_unet_x.lora_down.weight": t}` -> `{"lora_unet_x": {"lora_down.weight": t}}` (module
    names hold no dots)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        key, _, suffix = name.partition(".")
        out.setdefault(key, {})[suffix] = tensor
    return out


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A 1x1-conv weight [o,i,1,1] and a Linear weight [o,i] hold the same numbers; files use either
    for SD2's proj_in/proj_out (kohya: conv from single-file checkpoints, Linear from diffusers folders)."""
    def core(s):
        return tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)

    if tensor.shape != shape and core(tensor.shape) == core(shape):
        return tensor.reshape(shape)
    return tensor
