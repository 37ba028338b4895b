"""Run with the ComfyUI venv's python: train a Flux LoRA in place on ComfyUI 0.3.75's own loaded Flux.

The tiny Flux (engine/models/flux_tiny.py COMFY_TINY_T5_64: one double and one single block at full
width, txt_in for a 64-wide T5) goes through `comfy.sd.load_diffusion_model`, what Load Diffusion Model
runs, with weight_dtype default and fp8_e4m3fn; the CLIP is ComfyUI's Flux text encoder (what
DualCLIPLoader type=flux builds) over a random CLIP-L and a tiny T5 (the CI stand-in: flux_probe.py
says why), the VAE ComfyUI's over a random full-width ae. Each run trains 2 steps at 64 px through the
adapter the LoRA Trainer node picks (nodes/comfy_adapter.comfy_model), then ComfyUI's LoRA loader
(LoraLoader and LoraLoaderModelOnly: comfy.sd.load_lora_for_models) loads the file. Prints one JSON.

    $COMFYUI_PYTHON tests/hosts/comfyui/flux_train_probe.py WORK_DIR
"""
import hashlib
import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
from flux_probe import TINY_T5, flux_tiny, write_text_encoders  # noqa: E402
from keys_probe import load_pack  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402


def model_hash(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def make_clip(folder):
    """ComfyUI's Flux CLIP over a random CLIP-L and a 64-wide T5, loaded as DualCLIPLoader loads."""
    import torch

    import comfy.sd

    paths, _ = write_text_encoders(folder)
    with torch.inference_mode():
        return comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType.FLUX,
                                  model_options={"t5xxl_model_config": TINY_T5})


class LogTail(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def base_output(model, clip_cond, seed=3):
    """ComfyUI's own apply_model on fixed inputs (the patched model when a LoRA is loaded)."""
    import torch

    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond, pooled = clip_cond
    with torch.inference_mode():  # as ComfyUI runs nodes
        mm.load_models_gpu([model], force_full_load=True)
        return model.model.apply_model(x, torch.tensor([0.6]), c_crossattn=cond, y=pooled,
                                       guidance=torch.tensor([3.5])).float()


def forward_parity(dm, clip) -> float:
    """The engine's out-of-place forward over ComfyUI's modules against ComfyUI's own Flux forward."""
    import torch

    from inplace_pack.engine.models.flux_forward import flux_forward

    cond, pooled = clip.encode_from_tokens(clip.tokenize("stripes"), return_pooled=True)
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(4))
    sigma, guidance = torch.tensor([0.4]), torch.tensor([1.0])
    with torch.inference_mode():
        theirs = dm(x, sigma, cond, y=pooled, guidance=guidance).float()
        ours = flux_forward(dm, x, sigma, cond, pooled, guidance).float()
    return float((theirs - ours).abs().max() / theirs.abs().max())


def run(weight_dtype, folder, paths, clip, vae, data):
    import torch

    import comfy.sd

    from inplace_pack.engine.config import TrainConfig
    from inplace_pack.engine.lora.kohya_io import read_lora
    from inplace_pack.engine.train import train
    from inplace_pack.nodes.comfy_adapter import comfy_model

    options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(paths["model"], model_options=options)
    dm = model.model.diffusion_model
    before = model_hash(dm)
    clip_before = model_hash(clip.cond_stage_model)
    dtypes_before = sorted({str(p.dtype) for p in dm.parameters()})
    adapter = comfy_model(model, clip, vae, name="flux_tiny.safetensors")
    out_parity = forward_parity(dm, clip)
    cfg = TrainConfig(train_data_dir=data, output_dir=os.path.join(folder, "out_" + weight_dtype), output_name="flux",
                      resolution="64", batch_size=1, max_train_steps=2, lora_rank=4, learning_rate=1e-2, seed=7,
                      save_every_n_epochs=0, lr_scheduler="constant", warmup_steps=0, gradient_checkpointing=True,
                      train_text_encoder=weight_dtype == "default",
                      sample_prompts=["stripes"] if weight_dtype == "default" else [],
                      sample_every_n_steps=0, sample_steps=2, cache_latents="memory")
    from inplace_pack.engine.models import fp8 as engine_fp8

    casts, own = [], engine_fp8.CastLinear.forward  # counts the Linear calls that kept fp8, not a bf16 copy
    engine_fp8.CastLinear.forward = staticmethod(lambda ctx, *args: casts.append(1) or own(ctx, *args))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = train(cfg, adapter)
    finally:
        engine_fp8.CastLinear.forward = staticmethod(own)
    tensors, metadata = read_lora(result.lora_path)
    after = model_hash(dm)
    out = {"forward_max_diff": out_parity, "adapter": type(adapter).__name__, "family": adapter.info.family, "variant": adapter.info.variant,
           "losses": [float(v) for v in result.losses], "steps": result.steps,
           "hash_unchanged": before == after, "clip_hash_unchanged": clip_before == model_hash(clip.cond_stage_model),
           "dtypes_before": dtypes_before, "dtypes_after": sorted({str(p.dtype) for p in dm.parameters()}),
           "inference_after": all(p.is_inference() for p in dm.parameters()), "fp8_casts": len(casts),
           "n_keys": len(tensors), "te_keys": sum(k.startswith("lora_te1_") for k in tensors),
           "sample_key": sorted(tensors)[0],
           "base_model_version": metadata.get("ss_base_model_version"),
           "architecture": metadata.get("modelspec.architecture"),
           "previews": sorted(str(p.relative_to(result.output_dir)) for p in result.output_dir.rglob("step*.png"))}
    del adapter

    # ComfyUI's LoraLoader and LoraLoaderModelOnly nodes on the file, found in a `loras` folder
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("loras", str(result.lora_path.parent))
    name = result.lora_path.name
    tokens = clip.tokenize("stripes")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    base = base_output(model, (cond, pooled))
    tails = {"lora_loader": LogTail(), "model_only": LogTail()}
    with torch.inference_mode():  # as ComfyUI runs nodes
        logging.getLogger().addHandler(tails["lora_loader"])
        full_m, full_c = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
        logging.getLogger().removeHandler(tails["lora_loader"])
        logging.getLogger().addHandler(tails["model_only"])
        (only_m,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
        (zero_m,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.0)
        logging.getLogger().removeHandler(tails["model_only"])
        # the LoRA patched in at strength 0 (the nodes return the base model itself for 0)
        patched_zero, _ = comfy.sd.load_lora_for_models(model, None, tensors, 0.0, 0.0)
    with_lora = base_output(only_m, (cond, pooled))
    with_zero = base_output(zero_m, (cond, pooled))
    with_patched_zero = base_output(patched_zero, (cond, pooled))
    # LoraLoader: every key loads; LoraLoaderModelOnly: every lora_unet key (it has no CLIP for lora_te1)
    out["not_loaded"] = [ln for ln in tails["lora_loader"].lines if "not loaded" in ln][:5]
    out["not_loaded_model_only"] = [ln for ln in tails["model_only"].lines
                                    if "not loaded" in ln and "lora_te1_" not in ln][:5]
    out["strength1_changes"] = float((with_lora - base).abs().max())
    out["strength0_equal"] = bool(torch.equal(with_zero, base))
    out["patched_strength0_diff"] = float((with_patched_zero - base).abs().max())
    del full_m, full_c
    return out


def write_data(folder) -> str:
    """Two 64 px striped images with captions; returns their folder."""
    from PIL import Image

    data = os.path.join(folder, "data")
    os.makedirs(data, exist_ok=True)
    for i in range(2):
        img = Image.new("RGB", (64, 64), (40 + 80 * i, 90, 200 - 60 * i))
        for x in range(0, 64, 8):
            img.paste((250, 250, 250), (x, 0, x + 3 + i, 64))
        img.save(os.path.join(data, f"img{i}.png"))
        open(os.path.join(data, f"img{i}.txt"), "w").write(f"stripes {i}")
    return data


def comfy_flux_inputs(folder):
    """ComfyUI on the CPU with the pack loaded, the tiny Flux and its VAE written into `folder`, the
    training images, ComfyUI's Flux CLIP and the loaded VAE: what each Flux probe trains from."""
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.model_management  # noqa: F401
    import comfy.sd
    import comfy.utils

    load_pack()
    ft = flux_tiny()
    os.makedirs(folder, exist_ok=True)
    paths = {"model": ft.write_flux(os.path.join(folder, "flux_tiny.safetensors"), ft.COMFY_TINY_T5_64),
             "vae": ft.write_flux_vae(os.path.join(folder, "ae.safetensors"))}
    data = write_data(folder)
    clip = make_clip(folder)
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))
    return paths, clip, vae, data


def main(folder):
    paths, clip, vae, data = comfy_flux_inputs(folder)
    result = {w: run(w, folder, paths, clip, vae, data) for w in sys.argv[2:] or ("default", "fp8_e4m3fn")}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
