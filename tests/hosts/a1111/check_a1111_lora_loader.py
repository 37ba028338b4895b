"""A1111's own Lora extension reads our LoRA, LoHa, LoKr and DoRA tensors as we train them.

A manual host check, not part of the default test run (CI cannot fetch A1111): run it with
`A1111_ROOT=/path/to/stable-diffusion-webui python -m pytest tests/hosts/a1111/check_a1111_lora_loader.py`
and record the result in tests/hosts/README.md. Without A1111_ROOT every test fails saying so.

A1111's network modules (extensions-builtin/Lora: network.py, network_lora.py, network_hada.py,
network_lokr.py, lyco_helpers.py) are imported from a WebUI checkout named by A1111_ROOT (checked with
v1.10.1, commit 82a973c0) over tests/a1111's fake `modules` (fake_webui.py). For each module kind and each layer kind
(Linear, 1x1 and 3x3 Conv2d) A1111 must pick the right module type for the file's tensors (its loader
raises "Could not find a module type" otherwise) and its `calc_updown` at strength s must equal s
times our hook's update, so `<lora:name:s>` in A1111 gives what the trainer trained.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.lora.network import LoRAModule, LoRANetwork
from engine.lora.variants import DoRAModule, LoHaModule, LoKrModule

FAKES = Path(__file__).resolve().parents[2] / "a1111"  # tests/a1111: the fake WebUI
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

import fake_webui  # noqa: E402

A1111_ROOT = os.environ.get("A1111_ROOT", "")
LORA_DIR = Path(A1111_ROOT) / "extensions-builtin" / "Lora"

KINDS = {"lora": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule, "dora": DoRAModule,
         "lokr_low": lambda base, rank, alpha, dropout: LoKrModule(base, 2, alpha, dropout, factor=4,
                                                                   decompose_both=True)}
EXPECTED_TYPE = {"lora": "NetworkModuleLora", "dora": "NetworkModuleLora", "loha": "NetworkModuleHada",
                 "lokr": "NetworkModuleLokr", "lokr_low": "NetworkModuleLokr"}
LAYERS = {"linear": lambda: nn.Linear(64, 48), "pointwise": lambda: nn.Conv2d(32, 48, 1),
          "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1)}


@pytest.fixture
def a1111(monkeypatch, tmp_path):
    """A1111's network modules, imported fresh over the fake WebUI plus the few modules they import."""
    if not (LORA_DIR / "network_lokr.py").is_file():
        pytest.fail(f"A1111_ROOT={A1111_ROOT!r} is not an A1111 WebUI checkout (v1.10.x) with "
                    f"extensions-builtin/Lora/network_lokr.py: set it to one to run this check.", pytrace=False)
    fake_webui.install(monkeypatch, tmp_path / "webui")
    modules = sys.modules["modules"]
    stubs = {"modules.cache": {}, "modules.errors": {}, "modules.hashes": {}, "modules.models": {},
             "modules.models.sd3": {}, "modules.models.sd3.mmdit": {"QkvLinear": type("QkvLinear", (nn.Linear,), {})}}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        module.__path__ = []
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    monkeypatch.setattr(modules.devices, "cpu", torch.device("cpu"), raising=False)
    monkeypatch.setattr(modules.devices, "dtype", torch.float32, raising=False)
    monkeypatch.syspath_prepend(str(LORA_DIR))
    names = ("lyco_helpers", "network", "network_lora", "network_hada", "network_lokr")
    for name in names:  # recorded as absent, so nothing of A1111's stays imported after the test
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    return types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})


def _file_modules(kind: str, layer: str):
    """(base layer, our module, the module's tensors as the saved fp16 file holds them)."""
    torch.manual_seed(0)
    base = LAYERS[layer]()
    net = LoRANetwork()
    module = net.add("lora_unet_layer", base, 4, 2.0, factory=KINDS[kind])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    saved = {k.split(".", 1)[1]: v for k, v in net.kohya_state_dict().items()}
    fresh = LoRANetwork()  # what the file holds, read back (fp16 rounding included)
    reread = fresh.add("lora_unet_layer", base, module.rank, float(module.alpha), factory=KINDS[kind])
    fresh.load_kohya_state_dict({f"lora_unet_layer.{k}": v for k, v in saved.items()})
    return base, reread, saved


def _a1111_module(a1111, base, weights: dict, strength: float):
    net = a1111.network.Network("test", None)
    net.te_multiplier = net.unet_multiplier = strength
    # float32 copies: A1111 computes in the file's dtype; the layout and math are what is compared here
    w = a1111.network.NetworkWeights(network_key="lora_unet_layer", sd_key="diffusion_model_layer",
                                     w={k: v.float() for k, v in weights.items()},
                                     sd_module=base)
    for module_type in (a1111.network_lora.ModuleTypeLora(), a1111.network_hada.ModuleTypeHada(),
                        a1111.network_lokr.ModuleTypeLokr()):  # networks.py tries them in this order
        module = module_type.create_module(net, w)
        if module is not None:
            return module
    raise AssertionError(f"A1111 finds no module type for {sorted(weights)}")


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a1111_applies_our_update(a1111, kind, layer):
    base, ours, weights = _file_modules(kind, layer)
    expected = ours.delta_weight().detach()
    for strength in (1.0, 0.6):
        module = _a1111_module(a1111, base, weights, strength)
        assert type(module).__name__ == EXPECTED_TYPE[kind]
        with torch.no_grad():
            updown, _ = module.calc_updown(base.weight.detach().clone())
        updown = updown.reshape(base.weight.shape)  # A1111 reshapes it onto the weight the same way
        assert torch.allclose(updown, strength * expected, rtol=1e-4, atol=1e-6), \
            (kind, layer, strength, (updown - strength * expected).abs().max())
    assert float(expected.abs().max()) > 1e-3  # the update is not trivially zero
