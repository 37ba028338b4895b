"""LoRA variants beside kohya's LoRA/LoCon: LoHa, LoKr and DoRA, as LyCORIS defines and names them.

`network_type` picks the module every targeted layer gets (the layers themselves still come from
`target_modules`): lora and locon are engine/lora/network.py's LoRAModule (locon = LoRA with the
locon preset), loha.py, lokr.py and dora.py the others. Each module has the interface LoRANetwork
drives (see network.py), so hooks, the once-per-step weight cast, the CUDA-graphed step, saving and
continuing from a file work the same for all of them. Files use LyCORIS' tensor names and
`ss_network_module: lycoris.kohya` with `ss_network_args` (lycoris_args.py).
"""

from __future__ import annotations

from functools import partial

import torch

from ...config import NETWORK_TYPES
from ...errors import UserError
from ..network import LoRAModule
from .dora import DoRAModule
from .loha import LoHaModule
from .lokr import LoKrModule, factorization

LYCORIS_TYPES = ("loha", "lokr", "dora")
NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
# tensor names that only LyCORIS' Tucker (CP) forms have; not made, not continued
_TUCKER = (".lokr_t1", ".lokr_t2", ".hada_t1", ".hada_t2", ".lora_mid.weight")

__all__ = ["NETWORK_TYPES", "LYCORIS_TYPES", "module_factory", "file_network_type", "check_file_type", "factorization",
           "LoRAModule", "LoHaModule", "LoKrModule", "DoRAModule"]


def module_factory(cfg):
    """`factory(base, rank, alpha, dropout)` making the module `cfg.network_type` asks for."""
    kind = cfg.network_type
    if kind == "loha":
        return LoHaModule
    if kind == "lokr":
        return partial(LoKrModule, factor=cfg.lokr_factor, decompose_both=cfg.decompose_both,
                       full_matrix=cfg.full_matrix)
    if kind == "dora":
        return DoRAModule
    return LoRAModule


def file_network_type(tensors: dict[str, torch.Tensor], name: str = "the LoRA file") -> str:
    """lora, loha, lokr or dora: what a file's tensor names say it holds (a plain LoRA/LoCon file, or a
    diffusers/PEFT/ComfyUI one, is lora). Forms this trainer cannot continue are refused by name."""
    kinds = set()
    for key in tensors:
        if key.endswith(_TUCKER):
            raise UserError(f"{name} uses LyCORIS' Tucker (CP) decomposition ({key}); this trainer makes and "
                            f"continues LoRA, LoCon, LoHa, LoKr and DoRA without it (use_tucker off).")
        if ".lokr_" in key:
            kinds.add("lokr")
        elif ".hada_" in key:
            kinds.add("loha")
        elif key.endswith(".dora_scale"):
            kinds.add("dora")
        elif key.endswith((".weight", ".alpha")):
            kinds.add("lora")
    if "dora" in kinds and kinds & {"loha", "lokr"}:
        raise UserError(f"{name} is a {'/'.join(NAMES[k] for k in sorted(kinds - {'dora', 'lora'}))} with DoRA "
                        f"(dora_scale); continuing it is not supported (DoRA is trained on LoRA/LoCon here).")
    if len(kinds & {"loha", "lokr"}) > 1:
        raise UserError(f"{name} mixes LoHa and LoKr modules; continuing it is not supported.")
    for kind in ("dora", "lokr", "loha"):
        if kind in kinds:
            return kind
    return "lora"


def check_file_type(cfg, tensors: dict[str, torch.Tensor], path) -> None:
    """Refuse to continue a file of another module kind than `cfg.network_type`, saying which to set."""
    kind = file_network_type(tensors, f"'{path}'")
    if kind != ("lora" if cfg.network_type == "locon" else cfg.network_type):
        wanted = "lora (or locon)" if kind == "lora" else kind
        raise UserError(f"'{path}' is a {NAMES[kind]} file, but network_type is {cfg.network_type}; set "
                        f"network_type: {wanted} to continue it.")
