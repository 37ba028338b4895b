"""fp8_compute on ComfyUI's own fp8 Linear layers (comfy.ops manual_cast, scaled fp8): the stored fp8
weights are multiplied as they are (no copy), within fp8's tolerance of ComfyUI's own forward, and
left bit-identical; a layer with ComfyUI patch functions is left to ComfyUI. Runs on the CPU through
torch's CPU _scaled_mm in the ComfyUI venv (fp8_compute_probe.py)."""
import pytest

from comfy_workflows import run_probe


@pytest.fixture(scope="module")
def probe(comfy_python):
    return run_probe(comfy_python, "fp8_compute_probe.py")


@pytest.mark.parametrize("layer", ["plain", "scaled"])
def test_comfyui_fp8_linear_runs_on_its_stored_fp8_weights(probe, layer):
    r = probe[layer]
    assert r["taken_over"] == 1 and r["stored_weight_used"]
    assert not r["output_equal"] and r["output_rel"] < 0.06 and r["input_grad_rel"] < 0.06
    assert r["bit_identical"] and r["attributes_restored"]


def test_comfyui_linear_with_patch_functions_keeps_comfyuis_forward(probe):
    r = probe["patched"]
    assert r["taken_over"] == 0 and r["output_equal"] and r["bit_identical"] and r["attributes_restored"]
