"""Training checkpoints that resume exactly.

A checkpoint folder `checkpoints/step-00000500/` holds the fp32 LoRA weights, the optimizer, scheduler
and GradScaler state, every RNG the run draws from, the position in the data stream and a fingerprint
of the settings that must not change across a resume. It is written to a temp folder and renamed, so
a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

STATE_FILE = "state.pt"
WEIGHTS_FILE = "lora_fp32.safetensors"
# Settings that change what a step computes or where the data stream is: resuming with other values
# would not continue the same run.
FINGERPRINT_KEYS = ("lora_rank", "lora_alpha", "target_modules", "conv_rank", "conv_alpha",
                    "train_text_encoder", "batch_size", "gradient_accumulation_steps", "seed", "optimizer",
                    "network_type", "lokr_factor", "decompose_both", "full_matrix")
# what a checkpoint written before a key was fingerprinted ran with
_FINGERPRINT_BEFORE = {"network_type": "lora", "lokr_factor": -1, "decompose_both": False, "full_matrix": False}


@dataclass
class Position:
    """Where the run is: optimizer updates done and the next micro-batch in the data stream."""

    step: int = 0
    micro: int = 0


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg_dict.get(k) for k in FINGERPRINT_KEYS}


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer, scheduler, scaler,
                    position: Position, rng: list[dict[str, Any]], cfg_dict: dict[str, Any],
                    lora_file: str | None) -> Path:
    """`rng` holds every process's RNG state, in rank order (one entry without several GPUs)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": position.step,
        "micro": position.micro,
        "rng": rng,
        "fingerprint": fingerprint(cfg_dict),
        "lora_file": lora_file,
    }, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(resume: str, root: Path) -> Path | None:
    """'latest' -> newest checkpoint under root (None when there is none); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint '{resume}' is not a checkpoint folder (it has no {STATE_FILE}). "
                        f"Use 'latest' or a folder like {root / 'step-00000100'}.")
    return path


def load_checkpoint(folder: Path, cfg_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state; refuses a checkpoint whose run settings differ from the config's."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved, now = state["fingerprint"], fingerprint(cfg_dict)
    saved = {k: saved.get(k, _FINGERPRINT_BEFORE.get(k)) for k in FINGERPRINT_KEYS}
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in FINGERPRINT_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise UserError(f"cannot resume from {folder}: these settings differ from the checkpoint's run "
                        f"({'; '.join(changed)}). Put them back, or start a new run without "
                        f"resume_from_checkpoint (network_weights can start from the LoRA file instead).")
    return load_file(str(folder / WEIGHTS_FILE)), state
