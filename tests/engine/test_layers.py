"""Imports go one way (docs/ARCHITECTURE.md): hosts -> adapters -> seam -> run -> step -> families and
objectives. A lower layer that imported a higher one would tie a family or an objective to one host
or to the loop, and a new family would again mean edits across the tree."""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"
HOST_MODULES = ("comfy", "folder_paths", "server", "nodes", "modules", "gradio", "inplace_lora_a1111", "launch")


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, relative imports resolved to `engine.`-rooted names."""
    package = ".".join(("engine",) + path.relative_to(ENGINE).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return out


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ENGINE)))
def test_the_engine_imports_no_host_module(path):
    hosts = [m for m in _imports(path) if m.split(".")[0] in HOST_MODULES]
    assert not hosts, f"{path.name} imports {hosts}; host modules are imported by the adapters, lazily"


@pytest.mark.parametrize("layer, allowed", [
    ("families", ("engine.families", "engine.errors")),
    ("objectives", ("engine.objectives",)),
    ("hostkit", ("engine.hostkit", "engine.families", "engine.errors")),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    for path in (ENGINE / layer).rglob("*.py"):
        engine = [m for m in _imports(path) if m.startswith("engine")]
        above = [m for m in engine if not m.startswith(allowed)]
        assert not above, f"{layer}/{path.name} imports {above}"


def test_the_step_does_not_import_the_run_or_the_seam():
    above = [m for m in _imports(ENGINE / "step.py") + _imports(ENGINE / "fast_step.py")
             if m.startswith(("engine.train", "engine.model", "engine.run_", "engine.models", "engine.data"))]
    assert not above, above
