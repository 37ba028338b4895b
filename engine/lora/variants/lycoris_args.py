"""LyCORIS' names for the variants, both ways: the metadata a file carries, and kohya configs that ask
for `network_module = "lycoris.kohya"` with `network_args = ["algo=lokr", "factor=8", ...]`.

kohya's train_network.py writes the module and its arguments as given (`ss_network_module`, and
`ss_network_args` as a JSON object of strings); LyCORIS' own files say `lycoris.kohya` with `algo`,
`factor`, `dora_wd` and friends. The same is written here, so A1111's metadata view, Civitai and
kohya-based tools read a LoKr/LoHa/DoRA file of ours as what it is.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError

# LyCORIS network_args -> our config key
_ARGS = {"factor": "lokr_factor", "decompose_both": "decompose_both", "full_matrix": "full_matrix",
         "use_tucker": "use_tucker", "use_cp": "use_tucker", "conv_dim": "conv_rank", "conv_alpha": "conv_alpha"}
# LyCORIS switches that mean "off" at these values; anything else is refused by name
_OFF = {"dropout": 0, "rank_dropout": 0, "module_dropout": 0, "use_scalar": False, "bypass_mode": False,
        "rs_lora": False, "unbalanced_factorization": False, "train_norm": False, "disable_conv_cp": True,
        "use_conv_cp": False, "rescaled": False, "constraint": 0, "train_t5xxl": False}
_PRESETS = {"full": "locon", "full-lin": "kohya", "attn-mlp": "kohya", "attn-only": "attention"}


def network_metadata(cfg, network_args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(ss_network_module, ss_network_args) for `cfg`'s network; `network_args` are the target ones."""
    kind = cfg.network_type
    if kind in ("lora", "locon"):
        return "networks.lora", network_args
    args = {"algo": {"dora": "locon" if cfg.target_modules == "locon" else "lora"}.get(kind, kind), **network_args}
    if kind == "lokr":
        args.update(factor=str(cfg.lokr_factor), decompose_both=str(cfg.decompose_both),
                    full_matrix=str(cfg.full_matrix))
    if kind == "dora":
        args.update(dora_wd="True", wd_on_output="False")
    args["use_tucker"] = "False"
    return "lycoris.kohya", args


def truth(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes", "on")


def from_lycoris_args(args: dict[str, Any], source: str, network_alpha: Any = None) -> tuple[dict[str, Any], list[str]]:
    """kohya's lycoris.kohya `network_args` (parsed to a dict) as our config keys, plus notes for the
    one summary line. `network_alpha` is the config's, which LyCORIS also uses for conv_alpha."""
    args = dict(args)
    algo = str(args.pop("algo", "lora")).lower()
    dora = truth(args.pop("dora_wd", False))
    on_output = args.pop("wd_on_output", None)
    if algo not in ("lora", "locon", "loha", "lokr"):
        raise ConfigError(f"{source}: lycoris algo={algo} is not supported here; lora, locon, loha and lokr are "
                          f"(with dora_wd=True for DoRA on lora/locon).")
    if dora and algo not in ("lora", "locon"):
        raise ConfigError(f"{source}: dora_wd=True with algo={algo} is not supported; DoRA trains on algo=lora "
                          f"or locon here.")
    out: dict[str, Any] = {"network_type": "dora" if dora else algo}
    notes = []
    preset = str(args.pop("preset", "full"))
    if preset not in _PRESETS:
        raise ConfigError(f"{source}: lycoris preset={preset} is not supported; use full, full-lin, attn-mlp or "
                          f"attn-only, or target_modules.")
    out["target_modules"] = "locon" if algo == "locon" else _PRESETS[preset]
    if preset == "full":
        notes.append("lycoris preset full is trained on the locon layers (transformer blocks, ResNet and "
                     "resampler convs; LyCORIS' full also adapts conv_in, conv_out and the time embedding)")
    if dora and (on_output is None or truth(on_output)):  # LyCORIS' default is wd_on_output=True
        notes.append("DoRA's magnitude is kept per input channel (wd_on_output=False), the form A1111 and "
                     "ComfyUI apply correctly; LyCORIS' wd_on_output=True (its default) is not used")
    for key, value in args.items():
        if key in ("verbose",):
            continue
        if key == "dropout" and not _same(value, 0):
            out["lora_dropout"] = value  # LoRA/LoCon's; LoHa/LoKr/DoRA have none (the config says so)
        elif key in _ARGS:
            out[_ARGS[key]] = truth(value) if key in ("decompose_both", "full_matrix", "use_tucker", "use_cp") \
                else value
        elif key in _OFF and _same(value, _OFF[key]):
            continue
        else:
            raise ConfigError(f"{source}: network_args {key}={value} is not supported for lycoris.kohya here; "
                              f"supported: algo, factor, decompose_both, full_matrix, dora_wd, preset, conv_dim, "
                              f"conv_alpha. Remove it to train.")
    if out["target_modules"] == "locon" and "conv_alpha" not in out and network_alpha is not None:
        out["conv_alpha"] = network_alpha  # LyCORIS: conv_alpha defaults to network_alpha, ours to conv_rank/2
    return out, notes


def _same(value: Any, off: Any) -> bool:
    if isinstance(off, bool):
        return truth(value) == off
    try:
        return float(value) == float(off)
    except (TypeError, ValueError):
        return False
