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
    def __init__(self, present):
        super().__init__("launch")
        self.present = set(present)

    def is_installed(self, name):
        return name in self.present

    def run_pip(self, command, desc=None):
        raise AssertionError("run_pip prints an unprefixed 'Installing ...' line; install.py runs pip itself")


class FakePip:
    """subprocess.run for `python -m pip install`: records the command and the constraints it was given."""

    def __init__(self, fail=()):
        self.fail, self.calls, self.constraint_texts = set(fail), [], []

    def __call__(self, cmd, check=False, **kwargs):
        self.calls.append(cmd)
        self.constraint_texts.append(Path(cmd[cmd.index("-c") + 1]).read_text(encoding="utf-8"))
        failed = any(name in cmd[4] for name in self.fail)
        return types.SimpleNamespace(returncode=1 if failed else 0, stdout="",
                                     stderr="Collecting x\nERROR: ResolutionImpossible" if failed else "")


@pytest.fixture
def pip(monkeypatch):
    fake = FakePip()
    monkeypatch.setattr(install.subprocess, "run", fake)
    return fake


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(install, "FAILED_FILE", tmp_path / "failed.json")
    monkeypatch.setattr(install, "requirement_lines", lambda path=None: ["diffusers>=0.30", "peft>=0.12",
                                                                         "pyyaml>=6", "torch>=99"])
    # pretend only these are importable, whatever the test venv holds
    monkeypatch.setattr(install, "installed_version",
                        lambda name: {"torch": "2.1.2", "pyyaml": "6.0.1"}.get(name.lower()))
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)


def test_installs_only_what_is_missing_with_the_hosts_pins(capsys, pip, monkeypatch):
    monkeypatch.setenv("INDEX_URL", "https://mirror.example/simple")  # the WebUI's own setting
    asked = install.main(FakeLaunch(present={"torch", "PyYAML"}))
    assert asked == ["diffusers>=0.30", "peft>=0.12", "onnxruntime"]
    assert [c[:5] for c in pip.calls] == [[sys.executable, "-m", "pip", "install", r] for r in asked]
    assert all(c[-2:] == ["--index-url", "https://mirror.example/simple"] for c in pip.calls)
    assert all("torch==2.1.2" in text for text in pip.constraint_texts)  # pip may not replace torch
    # the newest diffusers calls torch.xpu at import, which torch 2.1.2 (A1111 1.10's) lacks
    assert all("diffusers<0.36" in text.splitlines() for text in pip.constraint_texts)
    out = capsys.readouterr().out
    assert "torch 2.1.2 is older than torch>=99; keeping the host's version" in out
    assert all(line.startswith("[LoRA Trainer] ") for line in out.splitlines())  # "Installing ..." too
    assert "[LoRA Trainer] Installing peft>=0.12" in out


def test_a_failed_install_is_not_retried_until_the_host_changes(capsys, monkeypatch):
    monkeypatch.setattr(install.subprocess, "run", FakePip(fail={"peft"}))
    install.main(FakeLaunch(present={"torch", "PyYAML"}))
    assert "[LoRA Trainer] could not install peft>=0.12: ERROR: ResolutionImpossible" in capsys.readouterr().out
    monkeypatch.setattr(install.subprocess, "run", FakePip())
    assert install.main(FakeLaunch(present={"torch", "PyYAML"})) == ["diffusers>=0.30", "onnxruntime"]
    assert "failed before" in capsys.readouterr().out


def test_a_newer_torch_gets_no_cap(monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: {"torch": "2.6.0+cu124"}.get(name.lower()))
    assert install.constraints() == ["torch==2.6.0+cu124"]


def test_runs_without_launch(monkeypatch, pip):
    monkeypatch.setitem(sys.modules, "launch", None)  # `import launch` raises ImportError
    assert install.main() == ["diffusers>=0.30", "peft>=0.12", "onnxruntime"]  # pyyaml found by version
    assert pip.calls[0][:4] == [sys.executable, "-m", "pip", "install"] and "-c" in pip.calls[0]


def test_requirements_file_is_read_without_comments(tmp_path, monkeypatch):
    monkeypatch.undo()
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ndiffusers>=0.30  # why\n\n-r other.txt\ntqdm\n", encoding="utf-8")
    assert install.requirement_lines(req) == ["diffusers>=0.30", "tqdm"]
    assert install.package_name("kornia>=0.7") == "kornia" and install.package_name("a[b]==1") == "a"
    assert any(line.startswith("torch==") for line in install.constraints())
    assert importlib.metadata.version("torch") in " ".join(install.constraints())
