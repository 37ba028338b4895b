"""install.py on each Forge fork's own pinned packages: it installs only what that fork lacks and pins the
fork's torch, gradio, transformers and diffusers for pip, so nothing the fork ships is replaced.

The versions below are copied from each fork's requirements file at the snapshot named (plus the torch
its launcher installs); `requirements.txt` is this repository's real one."""

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import install  # noqa: E402

FORKS = {
    # lllyasviel/stable-diffusion-webui-forge dfdcbab6, requirements_versions.txt; torch 2.3.1 (launch_utils)
    "Forge": {"torch": "2.3.1", "gradio": "4.40.0", "transformers": "4.46.1", "diffusers": "0.31.0",
              "accelerate": "0.31.0", "safetensors": "0.4.2", "kornia": "0.6.7", "Pillow": "9.5.0",
              "tqdm": "4.66.1", "peft": "0.13.2", "huggingface-hub": "0.26.2", "numpy": "1.26.2",
              "pydantic": "2.8.2", "fastapi": "0.104.1", "protobuf": "3.20.0", "omegaconf": "2.2.3",
              "PyYAML": "6.0.1"},
    # Haoming02/sd-webui-forge-classic (neo), requirements.txt at 1e8cfbc1; torch and gradio from its
    # launcher (modules/launch_utils.py at 02e78d34: torch 2.9.1+cu130, gradio 3.43.2)
    "Forge Neo": {"torch": "2.9.1", "gradio": "3.43.2", "transformers": "4.57.6", "diffusers": "0.37.1",
                  "accelerate": "1.14.0", "safetensors": "0.8.0", "kornia": "0.6.12", "Pillow": "12.3.0",
                  "tqdm": "4.70.0", "huggingface-hub": "0.36.2", "numpy": "2.3.5", "pydantic": "2.10.6",
                  "fastapi": "0.127.1", "protobuf": "4.25.9", "PyYAML": "6.0.3"},
    # Panchovix/stable-diffusion-webui-reForge 3b56b268, requirements_versions.txt
    "reForge": {"torch": "2.7.1", "gradio": "3.41.2", "transformers": "4.48.1", "diffusers": "0.32.2",
                "accelerate": "0.21.0", "safetensors": "0.5.2", "kornia": "0.8.0", "pillow": "10.4.0",
                "huggingface_hub": "0.25.0", "numpy": "1.26.4", "fastapi": "0.94.0", "protobuf": "3.20.0",
                "setuptools": "69.5.1", "PyYAML": "6.0.1", "tqdm": "4.66.1"},
    # Haoming02/sd-webui-forge-classic (classic) 1f95d717, requirements.txt
    "Forge Classic": {"torch": "2.3.1", "gradio": "3.41.2", "transformers": "4.30.2", "diffusers": "0.31.0",
                      "accelerate": "0.21.0", "safetensors": "0.4.2", "kornia": "0.6.7", "Pillow": "9.5.0",
                      "huggingface-hub": "0.26.5", "numpy": "1.26.2", "pydantic": "1.10.20",
                      "fastapi": "0.94.0", "protobuf": "3.20.3", "PyYAML": "6.0.1", "tqdm": "4.66.1"},
}
NEVER_REPLACED = ("torch", "gradio", "transformers", "diffusers")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class ForkLaunch(types.ModuleType):
    """The fork's `launch` module: `is_installed` answers from its packages. install.py runs pip itself
    (`subprocess.run`), which `pip` records here with the constraints each call was given."""

    def __init__(self, packages: dict):
        super().__init__("launch")
        self.packages, self.pip_calls, self.constraint_texts = {_norm(k): v for k, v in packages.items()}, [], []

    def is_installed(self, name):
        return _norm(name) in self.packages or {"yaml": "pyyaml", "pil": "pillow"}.get(name.lower()) in self.packages

    def pip(self, cmd, check=False, **kwargs):
        self.pip_calls.append(cmd)
        self.constraint_texts.append(Path(cmd[cmd.index("-c") + 1]).read_text(encoding="utf-8"))
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")


@pytest.mark.parametrize("fork", FORKS)
def test_install_on_each_fork_adds_only_what_it_lacks(fork, monkeypatch, tmp_path, capsys):
    packages = FORKS[fork]
    launch = ForkLaunch(packages)
    monkeypatch.setattr(install, "FAILED_FILE", tmp_path / "failed.json")
    monkeypatch.setattr(install, "installed_version", lambda name: launch.packages.get(_norm(name)))
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(install.subprocess, "run", launch.pip)
    asked = install.main(launch)
    ours = [install.package_name(r) for r in install.requirement_lines()] + install.OPTIONAL
    assert set(ours) >= {"diffusers", "transformers", "safetensors", "accelerate"}  # the real file was read
    missing = [r for r in install.requirement_lines() + install.OPTIONAL
               if not launch.is_installed(install.package_name(r))]
    assert asked == missing  # nothing the fork already has is installed again, at any version
    assert all(install.package_name(r) not in NEVER_REPLACED for r in asked) and launch.pip_calls
    for text in launch.constraint_texts:
        for name in NEVER_REPLACED:
            assert f"{name}=={packages[name]}" in text.splitlines(), (fork, name)
    out = capsys.readouterr().out
    if packages.get("kornia", "9").startswith("0.6"):
        assert "keeping the host's version" in out  # older than our wish: left alone, said once
