"""The tiny Flux files the Flux tests build (engine/models/flux_tiny.py) are Flux to real ComfyUI 0.3.75:
Load Diffusion Model detects them as Flux.1 dev with every key used, in the default dtype and in
fp8_e4m3fn, and a forward gives a finite latent; the autoencoder loads as Flux's 16-channel VAE; the
Flux text encoder over a tiny T5 feeds a Flux whose txt_in takes that width. Also records a fact the
trainer must work around: ComfyUI's Flux blocks add in place, so backpropagating through them fails
once a block's input needs a gradient. No server needed (flux_probe.py runs in the ComfyUI venv)."""
import json
import os
import subprocess

import pytest

from engine.models.flux_tiny import COMFY_TINY, flux_tensor_shapes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def probe(comfy_python):
    out = subprocess.run([comfy_python, os.path.join(HERE, "flux_probe.py")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_load_diffusion_model_detects_flux_dev(probe, weight_dtype):
    r = probe[weight_dtype]
    assert r["is_flux"] and r["config"] == "Flux" and r["model_type"] == "FLUX"
    assert r["sampling"] == "ModelSamplingFlux" and r["shift"] == 1.15
    assert r["latent_format"] == ["Flux", 0.3611, 0.1159, 16]
    cfg = r["unet_config"]
    assert (cfg["hidden_size"], cfg["depth"], cfg["depth_single_blocks"], cfg["guidance_embed"]) == (3072, 1, 1, True)
    assert (cfg["in_channels"], cfg["patch_size"], cfg["vec_in_dim"], cfg["context_in_dim"]) == (16, 2, 768, 4096)
    assert r["missing_in_comfy"] == [] and r["extra_in_comfy"] == []
    assert r["out_shape"] == [1, 16, 32, 32] and r["out_finite"] and r["out_std"] > 0.1
    n = len(flux_tensor_shapes(COMFY_TINY))
    if weight_dtype == "fp8_e4m3fn":  # every stored tensor fp8 (norm scales too), computed through manual_cast
        assert r["param_dtypes"] == {"torch.float8_e4m3fn": n} and r["linear_class"] == "manual_cast.Linear"
        assert r["manual_cast_dtype"] == "torch.float32"  # CPU; bf16 on a GPU that has it
    else:
        assert r["param_dtypes"] == {"torch.float32": n} and r["manual_cast_dtype"] == "None"


def test_flux_autoencoder_loads_as_16_channel_vae(probe):
    v = probe["vae"]
    assert v["latent_channels"] == 16 and v["model"] == "AutoencodingEngine"
    assert v["latent_shape"] == [1, 16, 8, 8] and v["decoded_shape"] == [1, 64, 64, 3] and v["finite"]


def test_flux_text_encoder_stand_in_feeds_the_model(probe):
    c = probe["clip"]
    w = c["with_model_config"]
    assert w["class"] == "FluxClipModel" and w["finite"]
    assert w["cond"] == [1, 256, 64] and w["pooled"] == [1, 768]  # T5 padded to 256 tokens; CLIP-L pooled
    assert c["long_prompt_t5_tokens"] > 256  # T5 is not cut at 256
    assert c["flux_t5_64_forward"] == {"out": [1, 16, 16, 16], "finite": True, "context_in_dim": 64}


def test_comfy_flux_blocks_are_not_differentiable_as_they_are(probe):
    """If this starts passing, ComfyUI made its Flux blocks autograd-safe and the trainer's workaround
    can go."""
    b = probe["backward"]
    assert b["final_layer.linear"] == "ok" and b["single_blocks.0.linear1"] == "ok"
    assert "modified by an inplace operation" in b["double_blocks.0.img_attn.qkv"]
