"""The command line in a new user's first hour: the demo model as base_model, inspect on anything,
xformers asked for, a second run with the same name, a Python without the packages, each warning once.
(Ctrl-C: tests/engine/test_train_options.py.)"""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.__main__ import main
from engine.errors import UserError
from engine.models.demo_model import DEMO_MODEL_FILE

from train_fixtures import pattern_dataset, tiny_diffusers_folder

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, *extra) -> int:
    data = tmp_path / "data"
    if not data.is_dir():
        pattern_dataset(data, n=2)
    return main(["train", "--set", f"base_model={DEMO_MODEL_FILE}", "--set", f"train_data_dir={data}",
                 "--set", f"output_dir={tmp_path / 'out'}", "--set", "output_name=style", "--set", "max_train_steps=1",
                 "--set", "resolution=64", "--set", "save_every_n_epochs=0", *extra])


def test_the_demo_model_is_a_base_model(tmp_path, capsys):
    assert _train(tmp_path) == 0
    lora = tmp_path / "out" / "style" / "style.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    assert "a text encoder on its own" not in capsys.readouterr().err


def test_a_second_run_never_replaces_the_first_lora(tmp_path, capsys):
    assert _train(tmp_path) == 0
    first = (tmp_path / "out" / "style" / "style.safetensors").read_bytes()
    assert _train(tmp_path, "--set", "seed=7") == 0
    out = capsys.readouterr().out
    assert "written as 'style_2'" in out and "<lora:style_2:0.8>" in out
    assert (tmp_path / "out" / "style" / "style.safetensors").read_bytes() == first
    assert (tmp_path / "out" / "style_2" / "style_2.safetensors").is_file()
    assert _train(tmp_path, "--set", "seed=8", "--set", "overwrite=true") == 0
    assert (tmp_path / "out" / "style" / "style.safetensors").read_bytes() != first
    assert not (tmp_path / "out" / "style_3").exists()


def _fake_xformers(monkeypatch):
    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)


def test_xformers_reaches_the_model_loader(tmp_path, monkeypatch):
    import engine.models.demo_model as demo

    seen = {}

    def stop_at_load(path, **kwargs):
        seen.update(kwargs)
        raise UserError("stopped at the model load")

    _fake_xformers(monkeypatch)
    monkeypatch.setattr(demo, "demo_model", stop_at_load)
    assert _train(tmp_path, "--set", "xformers=true") == 2
    assert seen["attention"] == "xformers"


def test_xformers_missing_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert _train(tmp_path, "--set", "attention=xformers") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: attention: xformers was asked for") and "attention: sdpa" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return tiny_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny sd1")


def test_inspect_says_what_a_model_is(diffusers_folder, capsys):
    assert main(["inspect", str(DEMO_MODEL_FILE)]) == 0
    assert "the built-in demo model" in capsys.readouterr().out
    assert main(["inspect", str(diffusers_folder)]) == 0
    out = capsys.readouterr().out
    assert "SD1.x diffusers model" in out and "usable as base_model" in out


def test_inspect_refuses_in_one_line(tmp_path, capsys):
    random_file = tmp_path / "random.safetensors"
    save_file({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, str(random_file))
    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)}, str(vae_only))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for path, said in ((random_file, "is not a Stable Diffusion checkpoint"), (vae_only, "a VAE on its own"),
                       (garbage, "safetensors")):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and len(err.strip().splitlines()) == 1, err


def test_missing_packages_name_what_to_install():
    # a Python where diffusers is not installed: `import diffusers` fails as it would there
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['yaml'] = None; "
            "from engine.__main__ import main; sys.exit(main(['train', '--set', 'lora_rank=4']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "needs the package pyyaml" in run.stderr and "pip install -r requirements.txt" in run.stderr
    assert "Traceback" not in run.stderr


def test_each_warning_is_shown_once_per_run(tmp_path):
    data = pattern_dataset(tmp_path / "data", n=2)
    (data / "img1.txt").unlink()  # "1 image(s) have no caption"
    run = subprocess.run([sys.executable, "-m", "engine", "train", "--set", f"base_model={DEMO_MODEL_FILE}",
                          "--set", f"train_data_dir={data}", "--set", f"output_dir={tmp_path / 'out'}",
                          "--set", "max_train_steps=1", "--set", "resolution=64"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("have no caption") == 1, run.stdout + run.stderr
