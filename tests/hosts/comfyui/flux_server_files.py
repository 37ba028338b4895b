"""Run with the ComfyUI venv's python: write the tiny Flux model files the server tests put into a
ComfyUI models/ folder, once, into a cache folder (kept between runs; bump the folder's version when
the writers change).

- diffusion_models/flux_tiny.safetensors: engine/models/flux_tiny.py COMFY_TINY_T5_64 (one double and
  one single block at width 3072, the only width ComfyUI detects as Flux; txt_in for a 64-wide T5), bf16
- vae/ae.safetensors: the full-width Flux autoencoder (the only one ComfyUI's VAE loader builds)
- text_encoders/clip_l_random.safetensors, t5xxl_tiny.safetensors: ComfyUI's own CLIP-L and a T5 of
  flux_probe.TINY_T5's size (the CI stand-in; load it with the probe pack's TinyFluxCLIPLoader)

Prints one JSON object {"folder": ..., "files": {models subfolder: file name}, "t5xxl_model_config": ...}.

    $COMFYUI_PYTHON tests/hosts/comfyui/flux_server_files.py CACHE_DIR
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flux_probe import TINY_T5, flux_tiny, write_text_encoders  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402

VERSION = "flux_server_v1"
FILES = {"diffusion_models": "flux_tiny.safetensors", "vae": "ae.safetensors",
         "text_encoders": ["clip_l_random.safetensors", "t5xxl_tiny.safetensors"]}


def main(cache):
    folder = os.path.join(cache, VERSION)
    done = os.path.join(folder, "complete")
    if not os.path.exists(done):  # a run killed half-way leaves no "complete": write everything again
        os.makedirs(folder, exist_ok=True)
        sys.path.insert(0, comfy_root())
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
        import comfy.model_management  # noqa: F401

        ft = flux_tiny()
        ft.write_flux(os.path.join(folder, FILES["diffusion_models"]), ft.COMFY_TINY_T5_64)
        ft.write_flux_vae(os.path.join(folder, FILES["vae"]))
        paths, _ = write_text_encoders(folder)
        assert [os.path.basename(p) for p in paths] == FILES["text_encoders"], paths
        open(done, "w").close()
    print(json.dumps({"folder": folder, "files": FILES, "t5xxl_model_config": TINY_T5}))


if __name__ == "__main__":
    main(sys.argv[1])
