"""Install what this extension needs into the WebUI's Python, and nothing else.

A1111 and Forge run this file on every start (`python install.py`, with the WebUI on PYTHONPATH so
`import launch` works); ComfyUI-Manager may run it too, where `launch` does not exist. Rules:
- only packages that are missing are installed (`launch.is_installed`, else importlib);
- a package that is present but older than we would like is left alone, with a note: the host's
  version wins;
- pip runs with constraints pinning the host's installed torch, torchvision, gradio, transformers,
  diffusers (and the other packages the WebUI pins), so installing never replaces them; when that is
  impossible the package is skipped with a message, and not retried until the host changes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
OPTIONAL = ["onnxruntime"]  # WD14 captioning in the tab; onnxruntime-gpu also satisfies it
# The host's versions of these are never changed.
PROTECTED = ["torch", "torchvision", "torchaudio", "xformers", "gradio", "gradio_client", "transformers",
             "diffusers", "huggingface_hub", "tokenizers", "safetensors", "accelerate", "numpy", "pillow",
             "pydantic", "fastapi", "starlette", "protobuf", "setuptools", "kornia"]
MODULE_OF = {"pyyaml": "yaml", "pillow": "PIL", "opencv-python": "cv2", "onnxruntime": "onnxruntime"}
FAILED_FILE = HERE / ".cache" / "install_failed.json"
# Newest releases that still import beside an older torch a host pins: diffusers 0.36 calls torch.xpu at
# import (torch 2.4+), and A1111 1.10 ships torch 2.1.2. (torch version below which, constraint)
FOR_OLDER_TORCH = [((2, 4), "diffusers<0.36")]


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def package_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].strip()


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(name: str, launch=None) -> bool:
    """The WebUI's own check when available (distribution name, then importable module)."""
    candidates = [name, MODULE_OF.get(name.lower(), name.replace("-", "_"))]
    for candidate in candidates:
        if launch is not None and launch.is_installed(candidate):
            return True
        if installed_version(candidate) is not None:
            return True
        try:
            if importlib.util.find_spec(candidate) is not None:
                return True
        except (ImportError, ValueError):
            pass
    return False


def constraints() -> list[str]:
    """`name==version` for every protected package the host has, and the caps its torch needs."""
    pins = []
    for name in PROTECTED:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    torch_version = installed_version("torch")
    if torch_version is not None:
        numbers = tuple(int(n) for n in re.findall(r"\d+", torch_version)[:2])
        pins += [cap for below, cap in FOR_OLDER_TORCH if numbers < below]
    return pins


def _failures() -> dict:
    try:
        return json.loads(FAILED_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _remember_failure(requirement: str, key: str) -> None:
    data = _failures()
    data[requirement] = key
    try:
        FAILED_FILE.parent.mkdir(parents=True, exist_ok=True)
        FAILED_FILE.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError:
        pass


def _note_if_older(requirement: str, name: str) -> None:
    version = installed_version(name)
    try:
        from packaging.requirements import Requirement

        if version is not None and version not in Requirement(requirement).specifier:
            print(f"[LoRA Trainer] {name} {version} is older than {requirement}; keeping the host's version.")
    except Exception:  # no `packaging`, or an unusual requirement line: nothing to say
        pass


def pip_install(requirement: str, constraint_file: str) -> bool:
    """pip in this Python, announced and reported with the extension's prefix. Not the WebUI's
    `launch.run_pip`: that prints its own unprefixed "Installing ..." line. Like it, pip output is shown
    only on failure, and the WebUI's INDEX_URL is honoured."""
    print(f"[LoRA Trainer] Installing {requirement}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", requirement, "-c", constraint_file, "--prefer-binary"]
    if os.environ.get("INDEX_URL"):
        cmd += ["--index-url", os.environ["INDEX_URL"]]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        last = (result.stderr or result.stdout or "").strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        print(f"[LoRA Trainer] could not install {requirement}: {last[0]}")
    return result.returncode == 0


def main(launch=None) -> list[str]:
    """Install what is missing; returns the requirements pip was asked to install."""
    if launch is None:
        try:
            import launch as launch_module  # A1111 / Forge
            launch = launch_module
        except ImportError:
            launch = None
    pins = constraints()
    key = sys.executable + "|" + ",".join(pins)
    failed = _failures()
    asked = []
    for requirement in requirement_lines() + OPTIONAL:
        name = package_name(requirement)
        if is_installed(name, launch):
            _note_if_older(requirement, name)
            continue
        if failed.get(requirement) == key:
            print(f"[LoRA Trainer] {requirement} is missing; installing it failed before without changing the "
                  f"host's packages, so it is skipped (delete {FAILED_FILE} to retry).")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as fh:
            fh.write("\n".join(pins) + "\n")
            constraint_file = fh.name
        try:
            asked.append(requirement)
            if not pip_install(requirement, constraint_file):
                _remember_failure(requirement, key)
        finally:
            os.unlink(constraint_file)
    return asked


if __name__ == "__main__":
    main()
