"""Run with the ComfyUI venv's python: does real ComfyUI 0.3.75 take our tiny Flux files as Flux?

Writes engine.models.flux_tiny's COMFY_TINY diffusion model (BFL layout, one double and one single
block) and its full-width autoencoder to a temporary folder, then through ComfyUI's own loaders:
`comfy.sd.load_diffusion_model` (what Load Diffusion Model runs) with weight_dtype default and
fp8_e4m3fn, one `apply_model` forward of each at a 32x32 latent, and `comfy.sd.VAE` encode/decode.
Text side: ComfyUI's Flux CLIP (`flux_clip`, what DualCLIPLoader type=flux builds) over a random
full-size CLIP-L and a tiny T5 whose size comes through `model_options["t5xxl_model_config"]` (the
loader builds T5 from its fixed XXL config otherwise; a `clip_l_model_config` is overwritten by
`comfy/text_encoders/long_clipl.py: model_options_long_clip`, so CLIP-L stays full size). That is
the stand-in CI can afford. Prints one JSON object.

    $COMFYUI_PYTHON tests/hosts/comfyui/flux_probe.py [--keep DIR]
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
from make_checkpoint import comfy_root  # noqa: E402

TINY_T5 = {"num_layers": 1, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4}  # T5-XXL: 24, 4096, 10240, 64, 64


def flux_tiny():
    """engine/models/flux_tiny.py by path: the probe must not import the engine package's other parts."""
    if "flux_tiny" not in sys.modules:
        spec = importlib.util.spec_from_file_location("flux_tiny", os.path.join(REPO, "engine", "models", "flux_tiny.py"))
        mod = sys.modules["flux_tiny"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(mod)
    return sys.modules["flux_tiny"]


def dtypes(module):
    out = {}
    for p in module.parameters():
        out[str(p.dtype)] = out.get(str(p.dtype), 0) + 1
    return out


def probe_model(path, weight_dtype):
    import torch

    import comfy.model_base
    import comfy.sd

    options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
    patcher = comfy.sd.load_diffusion_model(path, model_options=options)
    model = patcher.model
    dm = model.diffusion_model
    ours = set(flux_tiny().flux_tensor_shapes(flux_tiny().COMFY_TINY))
    theirs = set(dm.state_dict())
    x = torch.randn(1, 16, 32, 32)
    sigma = torch.tensor([0.7])
    cond = torch.randn(1, 8, 4096)
    pooled = torch.randn(1, 768)
    with torch.no_grad():
        out = model.apply_model(x, sigma, c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]))
    cfg = model.model_config
    return {
        "is_flux": isinstance(model, comfy.model_base.Flux), "config": type(cfg).__name__,
        "model_type": model.model_type.name, "sampling": type(model.model_sampling).__mro__[1].__name__,
        "shift": float(getattr(model.model_sampling, "shift", float("nan"))),
        "latent_format": [type(model.latent_format).__name__, model.latent_format.scale_factor,
                          model.latent_format.shift_factor, model.latent_format.latent_channels],
        "unet_config": {k: (v if isinstance(v, (int, float, bool, str, list)) or v is None else str(v))
                        for k, v in cfg.unet_config.items()},
        "manual_cast_dtype": str(model.manual_cast_dtype), "linear_class": type(dm.img_in).__qualname__,
        "param_dtypes": dtypes(dm), "norm_scale_dtype": str(dm.double_blocks[0].img_attn.norm.query_norm.scale.dtype),
        "missing_in_comfy": sorted(ours - theirs), "extra_in_comfy": sorted(theirs - ours),
        "out_shape": list(out.shape), "out_finite": bool(torch.isfinite(out).all()), "out_std": float(out.std()),
    }


def probe_backward(path):
    """Training through ComfyUI's own Flux blocks: a trainable output offset (what a LoRA adds) on one
    Linear at a time, frozen weights, one backward. Their in-place `x += ...` adds break autograd
    whenever a block's input already needs a gradient."""
    import torch

    import comfy.sd

    dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
    dm.requires_grad_(False)
    out = {}
    for where in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.linear"):
        lin = dm.get_submodule(where)
        delta = torch.zeros(lin.weight.shape[0], requires_grad=True)
        hook = lin.register_forward_hook(lambda m, i, o, d=delta: o + d)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                pred = dm(torch.randn(1, 16, 16, 16), torch.tensor([0.5]), torch.randn(1, 8, 4096),
                          y=torch.randn(1, 768), guidance=torch.tensor([1.0]))
                pred.float().square().mean().backward()
            out[where] = "ok"
        except RuntimeError as exc:
            out[where] = str(exc).splitlines()[0][:200]
        finally:
            hook.remove()
    return out


def probe_vae(path):
    import torch

    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    img = torch.rand(1, 64, 64, 3)
    lat = vae.encode(img)
    dec = vae.decode(lat)
    return {"latent_channels": vae.latent_channels, "model": type(vae.first_stage_model).__name__,
            "latent_shape": list(lat.shape), "decoded_shape": list(dec.shape), "finite": bool(torch.isfinite(dec).all())}


def write_text_encoders(folder):
    """A random full-size CLIP-L and a tiny T5 in ComfyUI's own classes, written as DualCLIPLoader reads
    them; returns the two paths."""
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd
    from comfy import clip_model, sd1_clip
    from comfy.text_encoders.t5 import T5

    t5_cfg = json.load(open(os.path.join(os.path.dirname(comfy.sd.__file__), "text_encoders", "t5_config_xxl.json")))
    t5_cfg.update(TINY_T5)
    t5 = T5(t5_cfg, torch.float32, "cpu", comfy.ops.manual_cast)
    clip_cfg = json.load(open(os.path.join(os.path.dirname(sd1_clip.__file__), "sd1_clip_config.json")))
    clip_l = clip_model.CLIPTextModel(clip_cfg, torch.float32, "cpu", comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(0)
    for m in (t5, clip_l):  # ComfyUI's ops leave weights uninitialised: N(0, 0.02), norms 1, biases 0
        for name, p in m.named_parameters():
            with torch.no_grad():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:
                    p.fill_(0.0 if name.endswith("bias") else 1.0)
    paths = [os.path.join(folder, "clip_l_random.safetensors"), os.path.join(folder, "t5xxl_tiny.safetensors")]
    save_file({k: v.contiguous() for k, v in clip_l.state_dict().items()}, paths[0])
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, paths[1])
    return paths, t5


def probe_clip(folder):
    """ComfyUI's Flux text encoder (as DualCLIPLoader type=flux builds it) over a random CLIP-L and a tiny T5."""
    import torch

    import comfy.sd

    paths, t5 = write_text_encoders(folder)
    result = {}
    options = {"t5xxl_model_config": TINY_T5}
    clip = comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType.FLUX, model_options=options)
    tokens = clip.tokenize("a photo of a cat")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    result["with_model_config"] = {"class": type(clip.cond_stage_model).__mro__[1].__name__,
                                   "t5_tokens": len(tokens["t5xxl"][0]), "l_tokens": len(tokens["l"][0]),
                                   "cond": list(cond.shape), "pooled": list(pooled.shape),
                                   "finite": bool(torch.isfinite(cond).all() and torch.isfinite(pooled).all())}
    # the same conditioning through a Flux whose txt_in takes the tiny T5's width
    ft = flux_tiny()
    patcher = comfy.sd.load_diffusion_model_state_dict(ft.flux_state_dict(ft.COMFY_TINY_T5_64))
    with torch.no_grad():
        out = patcher.model.apply_model(torch.randn(1, 16, 16, 16), torch.tensor([0.5]), c_crossattn=cond,
                                        y=pooled, guidance=torch.tensor([3.5]))
    result["flux_t5_64_forward"] = {"out": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                                    "context_in_dim": patcher.model.model_config.unet_config["context_in_dim"]}
    long = clip.tokenize(" ".join(["word"] * 300))
    result["long_prompt_t5_tokens"] = len(long["t5xxl"][0])
    result["t5_sd_keys_sample"] = sorted(t5.state_dict())[:3]
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="write the files here and keep them")
    ap.add_argument("--skip-fp8", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, comfy_root())
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import comfy.model_management  # noqa: F401

    ft = flux_tiny()
    folder = args.keep or tempfile.mkdtemp(prefix="flux_probe_")
    os.makedirs(folder, exist_ok=True)
    model_path = ft.write_flux(os.path.join(folder, "flux_tiny.safetensors"), ft.COMFY_TINY)
    vae_path = ft.write_flux_vae(os.path.join(folder, "flux_ae.safetensors"))
    result = {"default": probe_model(model_path, "default")}
    if not args.skip_fp8:
        result["fp8_e4m3fn"] = probe_model(model_path, "fp8_e4m3fn")
    result["backward"] = probe_backward(model_path)
    result["vae"] = probe_vae(vae_path)
    result["clip"] = probe_clip(folder)
    if not args.keep:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    torch.set_printoptions(profile="short")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
