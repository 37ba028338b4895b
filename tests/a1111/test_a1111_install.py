"""install.py: installs only what is missing, never lets pip replace the host's pinned packages, and
runs without A1111's `launch` module (ComfyUI-Manager also runs install.py)."""

import importlib.metadata
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import install  # noqa: E402


class FakeLaunch(types.ModuleType):
    def __init__(self, present, fail=()):
        super().__init__("launch")
        self.present, self.fail, self.pip_calls, self.constraint_texts = set(present), set(fail), [], []

    def is_installed(self, name):
        return name in self.present

    def run_pip(self, command, desc=None):
        self.pip_calls.append(command)
        constraint_file = command.split('-c "')[1].split('"')[0]
        self.constraint_texts.append(Path(constraint_file).read_text(encoding="utf-8"))
        if any(name in command for name in self.fail):
            raise RuntimeError("Couldn't install.\nERROR: ResolutionImpossible")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(install, "FAILED_FILE", tmp_path / "failed.json")
    monkeypatch.setattr(install, "requirement_lines", lambda path=None: ["diffusers>=0.30", "peft>=0.12",
                                                                         "pyyaml>=6", "torch>=99"])
    # pretend only these are importable, whatever the test venv holds
    monkeypatch.setattr(install, "installed_version",
                        lambda name: {"torch": "2.1.2", "pyyaml": "6.0.1"}.get(name.lower()))
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)


def test_installs_only_what_is_missing_with_the_hosts_pins(capsys):
    launch = FakeLaunch(present={"torch", "PyYAML"})
    asked = install.main(launch)
    assert asked == ["diffusers>=0.30", "peft>=0.12", "onnxruntime"]
    assert all(call.startswith('install "') and " -c " in call for call in launch.pip_calls)
    assert all("torch==2.1.2" in text for text in launch.constraint_texts)  # pip may not replace torch
    out = capsys.readouterr().out
    assert "torch 2.1.2 is older than torch>=99; keeping the host's version" in out


def test_a_failed_install_is_not_retried_until_the_host_changes(capsys):
    first = FakeLaunch(present={"torch", "PyYAML"}, fail={"peft"})
    install.main(first)
    assert "could not install peft" in capsys.readouterr().out
    second = FakeLaunch(present={"torch", "PyYAML"})
    assert install.main(second) == ["diffusers>=0.30", "onnxruntime"]
    assert "failed before" in capsys.readouterr().out


def test_runs_without_launch(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)  # `import launch` raises ImportError
    monkeypatch.setattr(install.subprocess, "run",
                        lambda cmd, check: calls.append(cmd) or types.SimpleNamespace(returncode=0))
    assert install.main() == ["diffusers>=0.30", "peft>=0.12", "onnxruntime"]  # pyyaml found by version
    assert calls[0][:4] == [sys.executable, "-m", "pip", "install"] and "-c" in calls[0]


def test_requirements_file_is_read_without_comments(tmp_path, monkeypatch):
    monkeypatch.undo()
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ndiffusers>=0.30  # why\n\n-r other.txt\ntqdm\n", encoding="utf-8")
    assert install.requirement_lines(req) == ["diffusers>=0.30", "tqdm"]
    assert install.package_name("kornia>=0.7") == "kornia" and install.package_name("a[b]==1") == "a"
    assert any(line.startswith("torch==") for line in install.constraints())
    assert importlib.metadata.version("torch") in " ".join(install.constraints())
