"""Block-wise learning rates and ranks, as kohya's networks/lora.py reads them from network_args.

- `down_lr_weight` / `mid_lr_weight` / `up_lr_weight`: a multiplier of the UNet learning rate per block,
  as comma-separated numbers (missing ones are 1, extra ones ignored) or, for down/up, a preset:
  cosine, sine, linear, reverse_linear, zeros, optionally `+base` (e.g. `sine+.5`) added to each;
  multipliers at or below `block_lr_zero_threshold` are 0. A block at 0 gets no LoRA at all.
- `block_dims` / `block_alphas`: the rank and alpha of every block (all of the family's blocks, comma
  separated); `conv_block_dims` / `conv_block_alphas` the same for 3x3 convs (LoCon).

The block a LoRA key belongs to is the family's rule (`FamilySpec.blocks`, engine/families/blocks.py);
each block with a multiplier gets its own optimizer param group (`unet_block<N>`), as in kohya.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..families.blocks import BlockLayout

PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def _numbers(value, key: str, cast=float) -> list:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [cast(float(v)) if str(v).strip() else cast(0) for v in items]
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated numbers{' or a preset (' + ', '.join(PRESETS) + ')' if key != 'mid_lr_weight' and key in LR_KEYS else ''}; "
                          f"got {value!r}.") from None


def _preset(value: str, n: int, key: str) -> list[float]:
    name, _, base = value.partition("+")
    base_lr = float(base) if base else 0.0
    steps = list(range(n))
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in reversed(steps)]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in steps]
    if name == "linear":
        return [i / (n - 1) + base_lr for i in steps]
    if name == "reverse_linear":
        return [i / (n - 1) + base_lr for i in reversed(steps)]
    if name == "zeros":
        return [base_lr] * n
    raise ConfigError(f"{key} preset {name!r} is unknown; use one of {', '.join(PRESETS)} (optionally +base, "
                      f"e.g. sine+.5) or comma-separated numbers.")


def _side(value, n: int, key: str) -> list[float] | None:
    if value in ("", None):
        return None
    if isinstance(value, str) and value.split("+")[0].strip() in PRESETS and key != "mid_lr_weight":
        return _preset(value.strip(), n, key)
    weights = _numbers(value, key)[:n]
    return weights + [1.0] * (n - len(weights))


def used(cfg) -> bool:
    return any(getattr(cfg, k) not in ("", None) for k in LR_KEYS + DIM_KEYS)


def layout_for(cfg, spec) -> BlockLayout | None:
    """The family's layout when the config asks for block-wise settings (None when it does not);
    a clear error for a family without blocks."""
    if not used(cfg):
        return None
    if spec.blocks is None:
        raise ConfigError(f"block-wise learning rates and ranks ({', '.join(LR_KEYS + DIM_KEYS)}) need a model "
                          f"with a block layout; {spec.display_name} has none. Remove them to train.")
    return spec.blocks


def lr_weights(cfg, layout: BlockLayout) -> list[float] | None:
    """One learning-rate multiplier per block (kohya's get_block_lr_weight), or None when none is set."""
    sides = [_side(getattr(cfg, k), n, k) for k, n in zip(LR_KEYS, (layout.down, layout.mid, layout.up))]
    if all(s is None for s in sides):
        return None
    zero = cfg.block_lr_zero_threshold
    down, mid, up = ([w if w > zero else 0.0 for w in s] if s is not None else [1.0] * n
                     for s, n in zip(sides, (layout.down, layout.mid, layout.up)))
    return [1.0] * layout.head + down + mid + up + [1.0] * layout.tail


@dataclass
class BlockRanks:
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    def rank(self, index: int, conv: bool, default: tuple[int, float]) -> tuple[int, float]:
        """(rank, alpha) of a layer in block `index`; 3x3 convs keep `default` unless conv_block_dims."""
        if index < 0:
            return default
        if conv:
            return default if self.conv_dims is None else (self.conv_dims[index], self.conv_alphas[index])
        return self.dims[index], self.alphas[index]


def ranks(cfg, layout: BlockLayout) -> BlockRanks | None:
    """Per-block ranks (kohya's get_block_dims_and_alphas, with blocks whose lr multiplier is 0 removed),
    or None when neither block ranks nor block learning rates are set."""
    weights = lr_weights(cfg, layout)
    if weights is None and not any(getattr(cfg, k) not in ("", None) for k in DIM_KEYS):
        return None
    n = layout.total

    def full(key, cast, default):
        value = getattr(cfg, key)
        if value in ("", None):
            return None if default is None else [default] * n
        got = _numbers(value, key, cast)
        if len(got) != n:
            raise ConfigError(f"{key} must give all {n} blocks of this model ({layout.head + layout.down} down, "
                              f"{layout.mid} mid, {layout.up + layout.tail} up), comma-separated; got {len(got)}.")
        return got

    dims, alphas = full("block_dims", int, cfg.lora_rank), full("block_alphas", float, cfg.alpha)
    conv_dims = full("conv_block_dims", int, None)
    conv_alphas = full("conv_block_alphas", float, cfg.conv_alpha_value if conv_dims is not None else None)
    if weights is not None:
        for i, w in enumerate(weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockRanks(dims, alphas, conv_dims, conv_alphas)


def param_groups(cfg, network, layout: BlockLayout, unet_params: list) -> list[dict] | None:
    """The UNet's param groups, one per block (`unet_block<N>`, lr times its multiplier), or None when no
    multiplier is set. Blocks at 0 have no LoRA (`ranks`); their params, if any, are left out."""
    weights = lr_weights(cfg, layout)
    if weights is None:
        return None
    wanted = {id(p) for p in unet_params}
    by_block: dict[int, list] = {}
    for key, module in network.loras.items():
        if key in network.te_keys:
            continue
        params = [p for p in module.parameters() if id(p) in wanted]
        if params:
            by_block.setdefault(layout.index(key), []).extend(params)
    groups = []
    for index in sorted(by_block):
        multiplier = weights[index] if index >= 0 else 1.0
        if multiplier == 0:
            continue
        groups.append({"params": by_block[index], "lr": cfg.learning_rate * multiplier,
                       "name": f"unet_block{index}", "lr_weight": multiplier})
    return groups


def unet_param_groups(cfg, network, spec) -> list[dict] | None:
    """The UNet's param groups by block for the run's optimizer, or None (one `unet` group)."""
    layout = layout_for(cfg, spec)
    return None if layout is None else param_groups(cfg, network, layout, network.unet_parameters())


def network_args(cfg) -> dict[str, str]:
    """The block options as kohya records them in ss_network_args."""
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            for k in LR_KEYS + DIM_KEYS + ("block_lr_zero_threshold",)
            if (v := getattr(cfg, k)) not in ("", None, 0, 0.0)}
