"""The kohya keys of a LoRA trained in ComfyUI are the standalone trainer's, for full-size SD1.5 and
SDXL: ComfyUI's own UNet and CLIP classes (meta device, in the ComfyUI venv) named by our adapter,
against the diffusers architectures the CLI trains. Also: our LDM->diffusers names agree with
comfy.utils.unet_to_diffusers for SD1.5, SD2.1, SDXL and SSD-1B layouts. No server needed."""
import json
import os
import subprocess

import pytest

from engine.config import TrainConfig
from engine.lora.targets import build_network
from engine.models import full_size_model

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def comfy_side(comfy_python):
    out = subprocess.run([comfy_python, os.path.join(HERE, "keys_probe.py")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("family,config,count", [("sd1", "SD15", 264), ("sdxl", "SDXL", 986)])
def test_comfyui_keys_equal_the_standalone_keys(comfy_side, family, config, count):
    ours = comfy_side[family]
    assert ours["config"] == config
    standalone = sorted(build_network(full_size_model(family), TrainConfig.from_dict({"train_text_encoder": True})).loras)
    assert ours["keys"] == standalone
    assert len(standalone) == count


def test_ldm_names_map_like_comfyui(comfy_side):
    for name, result in comfy_side["maps"].items():
        assert result["checked"] > 300, name
        assert result["mismatches"] == [], (name, result["mismatches"][:5])
