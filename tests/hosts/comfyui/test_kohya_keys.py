"""The ComfyUI adapter on ComfyUI's own model classes (no server). Kohya keys of a LoRA trained in
ComfyUI are the standalone trainer's, for full-size SD1.5 and
SDXL: ComfyUI's own UNet and CLIP classes (meta device, in the ComfyUI venv) named by our adapter,
against the diffusers architectures the CLI trains. Also: our LDM->diffusers names agree with
comfy.utils.unet_to_diffusers for SD1.5, SD2.1, SDXL and SSD-1B layouts. No server needed."""
import pytest

from engine.config import TrainConfig
from engine.lora.targets import build_network
from engine.models import full_size_model

from comfy_workflows import run_probe


@pytest.fixture(scope="module")
def comfy_side(comfy_python):
    return run_probe(comfy_python, "keys_probe.py")


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


def test_adapter_detects_families_on_comfyui_classes(comfy_side):
    a = comfy_side["adapter"]
    assert a["sd1"] == {"family": "sd1", "prediction": "epsilon", "resolution": 512}
    assert a["sd2_v"] == {"family": "sd2", "prediction": "v_prediction", "resolution": 768}
    assert a["sdxl"] == {"family": "sdxl", "prediction": "epsilon", "resolution": 1024}


def test_sdxl_size_conditioning_is_comfyuis_encode_adm(comfy_side):
    assert comfy_side["adapter"]["sdxl_y_equal"]


def test_other_models_are_refused_with_a_message_naming_them(comfy_side):
    a = comfy_side["adapter"]
    assert "Flux model" in a["flux"]["refused"] and "SD1.x, SD2.x and SDXL" in a["flux"]["refused"]
    assert "sampling schedule was changed" in a["sd1_lcm"]["refused"]
