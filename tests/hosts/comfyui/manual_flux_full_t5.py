"""Manual run (not collected by pytest, not CI): Flux through ComfyUI's own DualCLIPLoader on the real
text-encoder layouts, the run issue 16 asks for once.

CI feeds the trainer from a stand-in CLIP (probe_nodes/flux_clip.py: ComfyUI's FluxClipModel with a
narrow T5), because ComfyUI builds T5 from its fixed T5-XXL config and a full T5-XXL is 4.76 B
parameters. This script writes, with random weights, the two files a Flux user has in
models/text_encoders:

- clip_l.safetensors: CLIP-L's text tower (transformers CLIPTextModel layout and config: 12 layers,
  width 768, 12 heads, 77 positions; plus text_projection as the files people share carry), fp16;
- t5xxl_fp8_e4m3fn.safetensors: T5-XXL's encoder (transformers T5EncoderModel layout and config:
  24 layers, d_model 4096, d_ff 10240, 64 heads, gated GELU), every tensor float8_e4m3fn (4.76 GB).
  The model is built on the meta device for its names and shapes only; each tensor is then made,
  cast and streamed into the file one at a time, so this process never holds more than one tensor.

plus the tiny Flux (engine/models/flux_tiny.py COMFY_TINY: txt_in takes T5-XXL's 4096) and ae, into a
temporary ComfyUI base folder; starts ComfyUI ($COMFYUI_PYTHON) over it with this node pack; posts the
Flux example workflow with DualCLIPLoader(type flux) feeding our LoRA Trainer, 2 steps at 64 px, and
Save LoRA; then prints one JSON report (times, the server's peak RSS, what the log said about the text
encoders) and deletes the folder. Needs about 7 GB of free disk and 10 GiB of free memory (the T5 stays
fp8 in ComfyUI's memory, 4.8 GB; the Flux is loaded fp8_e4m3fn as the example does).

    COMFYUI_PYTHON=~/.cache/inplace-lora-trainer/comfy-venv/bin/python \\
        ~/.cache/inplace-lora-trainer/venv/bin/python tests/hosts/comfyui/manual_flux_full_t5.py [--keep DIR]
"""
import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path[:0] = [REPO, HERE]
from comfy_workflows import load_api, make_images, one, ui_text  # noqa: E402
from flux_workflows import FLUX, flux_cpu_sized  # noqa: E402

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # ComfyUI's t5_config_xxl.json
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SAFETENSORS_DTYPES = {"torch.float8_e4m3fn": "F8_E4M3", "torch.float16": "F16"}
NEEDS_GIB = {"memory": 10, "disk": 7}


def meta_shapes(model_cls, config):
    """{name: shape} of a transformers model built on the meta device (no memory for weights)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def stream_safetensors(path, shapes, dtype, seed):
    """Write a .safetensors file tensor by tensor: random N(0, 0.02) matrices, norm weights 1, biases 0,
    cast to `dtype`; only one tensor exists at a time."""
    import torch

    code = SAFETENSORS_DTYPES[str(dtype)]
    size = torch.tensor([], dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n * size]}
        offset += n * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            if len(shape) > 1:
                t = torch.randn(shape, generator=gen).mul_(0.02)
            else:
                t = torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
            del t
    return os.path.getsize(path)


def write_text_encoders(folder):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = meta_shapes(CLIPTextModelWithProjection, CLIPTextConfig(**CLIP_L))
    clip = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in clip.items()}
    t5 = meta_shapes(T5EncoderModel, T5Config(**T5_XXL))
    t5.pop("encoder.embed_tokens.weight")  # tied to shared.weight; the files people share keep one copy
    sizes = {"clip_l.safetensors": stream_safetensors(os.path.join(folder, "clip_l.safetensors"), clip, torch.float16, 0),
             "t5xxl_fp8_e4m3fn.safetensors": stream_safetensors(
                 os.path.join(folder, "t5xxl_fp8_e4m3fn.safetensors"), t5, torch.float8_e4m3fn, 1)}
    params = {"clip_l": sum(_numel(s) for s in clip.values()), "t5xxl": sum(_numel(s) for s in t5.values())}
    return sizes, params


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def gib_available():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def peak_rss_gib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def load_server_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfyui_host_server", os.path.join(HERE, "server.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, deleted)")
    ap.add_argument("--weight-dtype", default="fp8_e4m3fn", help="UNETLoader's weight_dtype (the example's: fp8_e4m3fn)")
    ap.add_argument("--comfy-arg", action="append", default=[], help="extra ComfyUI argument (repeatable)")
    args = ap.parse_args()
    python = os.environ.get("COMFYUI_PYTHON")
    if not python:
        raise SystemExit("set COMFYUI_PYTHON to the ComfyUI venv's python (tests/hosts/comfyui/setup_comfyui.sh)")
    base = args.keep or tempfile.mkdtemp(prefix="flux_full_t5_")
    free_disk = shutil.disk_usage(os.path.dirname(os.path.abspath(base))).free / 2**30
    if gib_available() < NEEDS_GIB["memory"] or free_disk < NEEDS_GIB["disk"]:
        raise SystemExit(f"needs {NEEDS_GIB['memory']} GiB free memory and {NEEDS_GIB['disk']} GiB free disk; "
                         f"have {gib_available():.1f} GiB and {free_disk:.1f} GiB")
    report = {"memory_available_gib_at_start": round(gib_available(), 1), "weight_dtype": args.weight_dtype}
    server = None
    try:
        server_mod = load_server_module()
        server_mod.make_base_dir(base)
        dirs = {sub: os.path.join(base, "models", sub) for sub in ("text_encoders", "diffusion_models", "vae")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        t0 = time.monotonic()
        report["file_bytes"], report["params"] = write_text_encoders(dirs["text_encoders"])
        report["write_text_encoders_s"] = round(time.monotonic() - t0, 1)
        from engine.models import flux_tiny

        flux_tiny.write_flux(os.path.join(dirs["diffusion_models"], "flux_tiny.safetensors"), flux_tiny.COMFY_TINY)
        flux_tiny.write_flux_vae(os.path.join(dirs["vae"], "ae.safetensors"))
        make_images(os.path.join(base, "input", "flux_ds"), n=2)
        files = {"diffusion_models": "flux_tiny.safetensors", "vae": "ae.safetensors",
                 "text_encoders": ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]}
        g = flux_cpu_sized(load_api(FLUX), files, None, args.weight_dtype, "flux_ds", name="flux_full_t5", preview_prompt="")
        g = {k: v for k, v in g.items() if v["class_type"] not in ("InplaceLoRA_PreviewStrengths", "SaveImage")}
        g[one(g, "InplaceLoRA_SaveLoRA")]["inputs"]["name"] = "flux_full_t5"
        assert g[one(g, "DualCLIPLoader")]["inputs"]["type"] == "flux"

        server = server_mod.ComfyServer(python, base, extra_args=args.comfy_arg)
        server.start()
        low = [gib_available()]
        stop = threading.Event()

        def watch():
            while not stop.wait(0.5):
                low.append(gib_available())
        threading.Thread(target=watch, daemon=True).start()
        t0 = time.monotonic()
        entry = server.wait(server.post_prompt(g), timeout=7200)
        report["prompt_s"] = round(time.monotonic() - t0, 1)
        stop.set()
        report["server_peak_rss_gib"] = round(peak_rss_gib(server.proc.pid), 2)
        report["memory_available_gib_lowest"] = round(min(low), 1)
        report["status"] = entry["status"]["status_str"]
        events = server.status_events(entry)
        if "execution_error" in events:
            report["error"] = events["execution_error"].get("exception_message", "")[:2000]
        else:
            report["trainer_said"] = ui_text(entry, one(g, "InplaceLoRA_Trainer"))
            report["lora_file"] = os.path.isfile(os.path.join(base, "models", "loras", "flux_full_t5.safetensors"))
        log = server.log_text()
        report["log_text_encoder_lines"] = [ln for ln in log.splitlines()
                                            if "clip missing" in ln or "clip unexpected" in ln or "FluxClipModel" in ln
                                            or "CLIP/text encoder model load device" in ln][:10]
        report["log_lora_key_not_loaded"] = "lora key not loaded" in log
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0 if report.get("status") == "success" and report.get("lora_file") else 1


if __name__ == "__main__":
    sys.exit(main())
