"""Training checkpoints that resume exactly.

A checkpoint folder `checkpoints/step-00000500/` holds the fp32 LoRA weights, the optimizer, scheduler
and GradScaler state, every RNG the run draws from, the position in the data stream and a fingerprint
of the settings that must not change across a resume. It is written to a temp folder and renamed, so
a crash mid-write never leaves a checkpoint that looks complete.

The state is safetensors + JSON (`resume_state.py`), read without any unpickler, so a host that guards
`torch.load` (A1111's safe loading) cannot refuse it. Earlier versions wrote `state.pt` (a pickle);
those still load through torch's `weights_only` loader where the host and torch allow it.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .resume_state import JSON_FILE, load_state, save_state

STATE_FILE = JSON_FILE
LEGACY_STATE_FILE = "state.pt"  # a pickle, written by versions before the safetensors + JSON state
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
                    lora_file: str | None, more_weights: dict[str, dict[str, torch.Tensor]] | None = None,
                    guards: dict[str, Any] | None = None) -> Path:
    """`rng`: the RNG state the run resumes with (one entry; several processes share their generator).
    Processes of a several-GPU run that ends early may write the same step at once: same contents, the
    first complete folder stays. `more_weights`: other weight files of the run's state by file name
    (the EMA's). `guards`: what the out-of-memory recovery and the NaN guard changed in the run
    (engine/memory/recovery.py, engine/nan_guard.py), applied again on resume."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in {WEIGHTS_FILE: weights, **(more_weights or {})}.items():
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
    save_state(tmp, {
        "step": position.step,
        "micro": position.micro,
        "lora_file": lora_file,
        "fingerprint": fingerprint(cfg_dict),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "config": cfg_dict,
        "guards": guards or {},
    })
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if state_file(folder) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process of the run wrote this step first
    return folder


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and state_file(p) is not None]  # not a step-N.tmp<pid> being written
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
    if path.is_file() and path.name in (STATE_FILE, LEGACY_STATE_FILE):
        path = path.parent
    if state_file(path) is None:
        raise UserError(f"resume_from_checkpoint '{resume}' is not a checkpoint folder (it has no {STATE_FILE}). "
                        f"Use 'latest' or a folder like {root / 'step-00000100'}.")
    return path


def state_file(folder: Path) -> Path | None:
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


class ResumeMismatch(UserError):
    """The config differs from the checkpoint's run in settings a resume must keep; `changed` lists them
    as 'key: saved -> now', so a host can word its own advice."""

    def __init__(self, folder: Path, changed: list[str]):
        self.folder, self.changed = folder, changed
        super().__init__(f"cannot resume from {folder}: these settings differ from the checkpoint's run "
                         f"({'; '.join(changed)}). Put them back, or start a new run without "
                         f"resume_from_checkpoint (network_weights can start from the LoRA file instead).")


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's resume state (tensors on the CPU); UserError, saying what to do, when unreadable."""
    path = state_file(folder)
    if path is None:
        raise UserError(f"{folder} is not a checkpoint folder (it has no {STATE_FILE}).")
    if path.name == LEGACY_STATE_FILE:
        return _read_legacy(path)
    try:
        return load_state(folder)
    except (OSError, ValueError, KeyError) as exc:  # JSON or safetensors damaged, or a newer format
        raise UserError(f"cannot read the resume state in {folder}: {exc}. Resume from another checkpoint "
                        f"(an older step-* folder beside it) or start a new run.") from None


def _read_legacy(path: Path) -> dict[str, Any]:
    """An earlier version's `state.pt`, through torch's weights_only loader only (never a full unpickle).
    numpy's RNG state in it is an ndarray, which that loader reads once numpy's array globals are allowed
    (torch 2.5 and later); a host that guards torch.load may still refuse the file and return None."""
    try:
        with _numpy_arrays_allowed():
            state = torch.load(path, map_location="cpu", weights_only=True)
        why = "the host's torch.load refused it" if state is None else None
    except Exception as exc:  # UnpicklingError, or whatever a host's replacement raises
        state, why = None, str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
    if why is None and not (isinstance(state, dict) and "fingerprint" in state):
        why = "it does not hold a trainer's resume state"
    if why is not None:
        raise UserError(f"cannot resume from {path.parent}: its state.pt was written by an earlier version of "
                        f"the trainer as a pickle, and it cannot be read safely here ({why}). Checkpoints written "
                        f"from now on resume anywhere. To keep this run's progress, start a new run from its "
                        f"LoRA: network_weights {path.parent / WEIGHTS_FILE}.")
    return state


def _numpy_arrays_allowed():
    from contextlib import nullcontext

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch before 2.5: no allowlist; numpy arrays stay refused
        return nullcontext()
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return safe_globals([(rebuild, "numpy.core.multiarray._reconstruct"),
                         (rebuild, "numpy._core.multiarray._reconstruct"),
                         np.ndarray, np.dtype, type(np.dtype(np.uint32))])


def load_checkpoint(folder: Path, cfg_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state; refuses a checkpoint whose run settings differ from the config's."""
    state = read_state(folder)
    saved, now = state["fingerprint"], fingerprint(cfg_dict)
    saved = {k: saved.get(k, _FINGERPRINT_BEFORE.get(k)) for k in FINGERPRINT_KEYS}
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in FINGERPRINT_KEYS if saved.get(k) != now.get(k)]
    if any(c.startswith("batch_size") for c in changed):
        runs = state.get("config", {}).get("processes", 1), cfg_dict.get("processes", 1)
        changed = [c + (f" (the global batch: batch_size x processes; the checkpoint's run had {runs[0]} "
                        f"process(es), this one has {runs[1]})" if c.startswith("batch_size") else "")
                   for c in changed]
    if changed:
        raise ResumeMismatch(folder, changed)
    return load_file(str(folder / WEIGHTS_FILE)), state
