"""The adapters the seam's contract is checked on, as far as the CPU test box has them: the standalone
diffusers adapter, the ComfyUI adapter over a fake ComfyUI (fake_comfy.py) and the A1111 adapter over
the fake WebUI of tests/a1111. Each case builds the host's objects around the same tiny model (seed 0),
so the same model must give the same LoRA keys on every host."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for folder in (HERE, ROOT / "tests" / "a1111"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
PACK = "inplace_lora_pack"  # the repository imported as ComfyUI imports a node pack (tests/nodes/conftest.py)
if PACK not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)


@dataclass
class Hosted:
    """One adapter over one host's objects: what the contract tests drive."""

    model: object  # the TrainableModel
    roots: list[nn.Module]  # everything the host owns, for the bit-identical check
    train: Callable  # the engine's train() as this host imports it
    prediction_type: str
    checkpointing: bool = True  # whether the fake host can run gradient checkpointing


def _diffusers(family: str, v: bool):
    from engine.models import tiny_sd1, tiny_sd2, tiny_sdxl
    from engine.train import train

    build = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]
    model = build(prediction_type="v_prediction" if v else "epsilon")
    return Hosted(model, [model.unet, model.vae, *model.text_encoders], train, model.info.prediction_type)


def _comfyui(family: str, v: bool, monkeypatch):
    import fake_comfy
    from engine.models import tiny_sd1, tiny_sd2, tiny_sdxl

    fake_comfy.install(monkeypatch)
    adapter = __import__(f"{PACK}.nodes.comfy_adapter", fromlist=["ComfyModel"])
    train = __import__(f"{PACK}.engine.train", fromlist=["train"]).train
    tiny = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]()
    mp, clip, vae = fake_comfy.comfy_objects(tiny, v_prediction=v)
    return Hosted(adapter.ComfyModel(mp, clip, vae, name="tiny"), fake_comfy.fingerprint_roots(mp, clip, vae), train,
                  "v_prediction" if v else "epsilon", checkpointing=False)


def _a1111(family: str, v: bool, monkeypatch, tmp_path):
    import fake_webui
    from fake_models import FakeSD1, FakeSD2, FakeSDXL

    from engine.train import train
    from inplace_lora_a1111.adapter import A1111Model

    webui = fake_webui.install(monkeypatch, tmp_path / "webui")
    sd = {"sd1": FakeSD1, "sd2": FakeSD2, "sdxl": FakeSDXL}[family](webui.shared.opts)
    sd.parameterization = "v" if v else "eps"
    fake_webui.load_model(webui, sd)
    return Hosted(A1111Model(sd), [sd], train, "v_prediction" if v else "epsilon")


CASES = [(host, family, v) for host in ("diffusers", "comfyui", "a1111")
         for family, v in (("sd1", False), ("sd2", True), ("sdxl", False))]


@pytest.fixture(params=CASES, ids=[f"{h}-{f}{'-v' if v else ''}" for h, f, v in CASES])
def hosted(request, monkeypatch, tmp_path) -> Hosted:
    host, family, v = request.param
    if host == "diffusers":
        return _diffusers(family, v)
    if host == "comfyui":
        return _comfyui(family, v, monkeypatch)
    return _a1111(family, v, monkeypatch, tmp_path)


def fingerprint(roots: list[nn.Module]) -> dict:
    """Everything a host would notice: values, dtypes, devices, requires_grad, modes, hooks, forwards."""
    out = []
    for i, root in enumerate(roots):
        h = hashlib.sha256()
        for name, t in root.state_dict(keep_vars=True).items():
            h.update(f"{name} {t.dtype} {t.device} {tuple(t.shape)} {t.requires_grad}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append((h.hexdigest(), tuple(m.training for m in root.modules()),
                    sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules()),
                    sum("forward" in m.__dict__ for m in root.modules())))
    return {"roots": out}
