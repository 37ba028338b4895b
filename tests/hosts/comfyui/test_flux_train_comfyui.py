"""Flux.1 trains in place on what ComfyUI 0.3.75 loaded: the tiny Flux through Load Diffusion Model's code
(weight_dtype default and fp8_e4m3fn), ComfyUI's Flux CLIP over a random CLIP-L and a tiny T5 (the CI
stand-in the issue allows: T5-XXL is 9.5 GB), its VAE over a random ae. Each run trains through the
adapter the LoRA Trainer node picks, and ComfyUI's LoRA loaders take the file without a "lora key not
loaded"; strength 0 gives the base output, the host model (and the CLIP) hash the same afterwards, and
fp8 weights stay fp8 tensors, bit-identical. Runs flux_train_probe.py in the ComfyUI venv (~5-10 min
on 2 CPU cores: the tiny Flux is full width, 0.5 B parameters)."""
import pytest

from comfy_workflows import run_probe


@pytest.fixture(scope="module")
def runs(comfy_python, tmp_path_factory):
    return run_probe(comfy_python, "flux_train_probe.py", tmp_path_factory.mktemp("flux"), timeout=1800)


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_flux_trains_in_place_and_comfyui_loads_the_file(runs, weight_dtype):
    r = runs[weight_dtype]
    assert r["forward_max_diff"] < 1e-4  # the engine's forward over ComfyUI's modules = ComfyUI's forward
    assert r["adapter"] == "ComfyFluxModel" and (r["family"], r["variant"]) == ("flux1", "dev")
    assert r["steps"] == 2 and all(v == v and v < 1e4 for v in r["losses"])  # finite
    assert (r["base_model_version"], r["architecture"]) == ("flux1", "flux-1-dev/lora")
    # 1 double block x 10 + 1 single block x 3 modules (x down, up, alpha); CLIP-L's 72 when it trained
    assert r["n_keys"] == 3 * (13 + (72 if weight_dtype == "default" else 0))
    assert r["not_loaded"] == [] and r["not_loaded_model_only"] == []
    assert r["strength0_equal"] and r["strength1_changes"] > 1e-4
    if weight_dtype == "default":  # patched in at strength 0, bit for bit the base (fp8: ComfyUI re-rounds
        assert r["patched_strength0_diff"] == 0.0  # the fp8 weights stochastically when it patches them)
    assert r["hash_unchanged"] and r["clip_hash_unchanged"] and r["inference_after"]


def test_fp8_weights_stay_fp8(runs):
    r = runs["fp8_e4m3fn"]
    assert r["dtypes_before"] == r["dtypes_after"] == ["torch.float8_e4m3fn"]
    # ComfyUI's casting Linears kept their fp8 weight for backward, not a bf16 copy (engine/models/fp8_host.py)
    assert r["fp8_casts"] >= 2 * 13 and runs["default"]["fp8_casts"] == 0


def test_previews_come_from_comfyuis_sampler(runs):
    assert runs["default"]["previews"] == ["samples/step000002_00.png"]
