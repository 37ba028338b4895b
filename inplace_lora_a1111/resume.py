"""Resume: which stopped run the Resume control continues, and messages that name the control the
user actually has in front of them (the tab's buttons, or the API's request keys).

A stopped run keeps its work folder `outputs/lora-trainer/<name>/` with `checkpoints/step-*` and no
final `<name>.safetensors` (only a finished run writes that). Resume continues the newest such run
named after the requested stem, or after the stem with the `_2`, `_3` ... suffix that a taken name
gets (host.unique_name): "the last stopped run of this name", found from the files alone, so it also
works after the WebUI restarted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import ResumeMismatch, checkpoint_dirs
from engine.errors import ConfigError


@dataclass(frozen=True)
class Controls:
    """How the user starts things where they are: each phrase completes "To continue, ..."."""

    resume: str
    new_run: str


TAB = Controls(resume="press Resume", new_run="press Train")
API = Controls(resume='send the same request with "resume": true',
               new_run='send the request without "resume"')


def stopped_runs(stem: str, work_dir: Path) -> list[Path]:
    """Work folders of `stem` (or `stem_N`) that hold a checkpoint but no finished LoRA, oldest first."""
    if not work_dir.is_dir():
        return []
    name = re.compile(rf"^{re.escape(stem)}(_\d+)?$")
    runs = []
    for folder in work_dir.iterdir():
        if not (folder.is_dir() and name.match(folder.name)) or (folder / f"{folder.name}.safetensors").exists():
            continue
        found = checkpoint_dirs(folder / "checkpoints")
        if found:
            runs.append((found[-1].stat().st_mtime, folder))
    return [folder for _, folder in sorted(runs)]


def run_to_resume(stem: str, work_dir: Path, controls: Controls) -> str:
    """The name of the last stopped run of `stem`; ConfigError saying what to do when there is none."""
    runs = stopped_runs(stem, work_dir)
    if not runs:
        raise ConfigError(f"there is no stopped run named '{stem}' to resume (no unfinished run of that name "
                          f"with a checkpoint in {work_dir}). Check the LoRA name, or {controls.new_run} to "
                          f"start a new run.")
    return runs[-1].name


def mismatch_message(exc: ResumeMismatch, controls: Controls) -> str:
    return (f"cannot resume: these settings differ from the stopped run's ({'; '.join(exc.changed)}). "
            f"Put them back and {controls.resume} again, or {controls.new_run} to start a new run.")


def stopped_message(step: int, checkpoint: str | None, lora_file: Path, controls: Controls) -> str:
    kept = f"; checkpoint kept in {checkpoint}" if checkpoint else ""
    return (f"stopped at step {step}{kept}. The LoRA of that step is {lora_file.name} in the Lora folder. "
            f"To continue this run, {controls.resume} (same name and settings).")
