"""The Flux example workflow (example_workflows/train_flux_lora.api.json) as the server tests post it,
shrunk to CPU size, and the small Flux graphs around it (sample with and without the LoRA, fingerprint).

`flux_cpu_sized` keeps every node and link of the example and changes sizes and file names only, with
one swap: DualCLIPLoader becomes the probe pack's TinyFluxCLIPLoader (same ComfyUI loader call, a T5
small enough for CI; probe_nodes/flux_clip.py says why), keeping its node id and output.
"""
import copy
import json

from comfy_workflows import CPU_TRAINER, load_api

FLUX = "train_flux_lora"
# one sampling step wherever the graphs sample: a step of the full-width tiny Flux is seconds on a CPU
FLUX_TRAINER = {**{k: v for k, v in CPU_TRAINER.items() if k != "advanced"}, "batch_size": 1, "preview_steps": 1}
PROMPT = "stripes, mystyle style"


def clip_node(files, t5_config):
    l_name, t5_name = files["text_encoders"]
    return {"class_type": "InplaceLoRATest_TinyFluxCLIPLoader",
            "inputs": {"clip_name1": l_name, "clip_name2": t5_name, "t5xxl_model_config": json.dumps(t5_config)}}


def flux_cpu_sized(graph, files, t5_config, weight_dtype, folder, **trainer):
    """The Flux example at CPU test size; `trainer` overrides LoRA Trainer inputs (the example's
    `advanced` box, guidance 1.0 and flux_shift, is kept). `t5_config` None keeps DualCLIPLoader
    (for full-size text-encoder files), else the stand-in loader builds a T5 of that config."""
    g = copy.deepcopy(graph)
    for node_id, node in list(g.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "UNETLoader":
            inputs.update(unet_name=files["diffusion_models"], weight_dtype=weight_dtype)
        elif kind == "DualCLIPLoader" and t5_config is None:  # the real loader, real text-encoder files
            inputs.update(clip_name1=files["text_encoders"][0], clip_name2=files["text_encoders"][1], type="flux")
        elif kind == "DualCLIPLoader":
            assert inputs["type"] == "flux"
            g[node_id] = {**clip_node(files, t5_config), "_meta": node.get("_meta", {})}
        elif kind == "VAELoader":
            inputs["vae_name"] = files["vae"]
        elif kind == "InplaceLoRA_LoadDataset":
            inputs.update(folder=folder, resolution="64", buckets=False, repeats=1)
        elif kind == "InplaceLoRA_Trainer":
            inputs.update(FLUX_TRAINER)
            inputs.update(trainer)
        elif kind == "InplaceLoRA_PreviewStrengths":
            inputs.update(prompt=PROMPT, width=64, height=64, steps=1, strengths="0, 1")
    return g


def loaders(files, t5_config, weight_dtype, start):
    s = str
    return {s(start): {"class_type": "UNETLoader", "inputs": {"unet_name": files["diffusion_models"],
                                                              "weight_dtype": weight_dtype}},
            s(start + 1): clip_node(files, t5_config),
            s(start + 2): {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}}}


def flux_sample(prefix, model, clip, vae, start, seed=5):
    """Nodes that sample one 64 px Flux image as users do: CLIPTextEncode, FluxGuidance, an empty
    16-channel latent, KSampler (cfg 1), VAEDecode, SaveImage."""
    s = str
    return {
        s(start): {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": clip}},
        s(start + 1): {"class_type": "FluxGuidance", "inputs": {"conditioning": [s(start), 0], "guidance": 3.5}},
        s(start + 2): {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        s(start + 3): {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        s(start + 4): {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [s(start + 1), 0], "negative": [s(start + 2), 0],
            "latent_image": [s(start + 3), 0], "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0}},
        s(start + 5): {"class_type": "VAEDecode", "inputs": {"samples": [s(start + 4), 0], "vae": vae}},
        s(start + 6): {"class_type": "SaveImage", "inputs": {"images": [s(start + 5), 0], "filename_prefix": prefix}},
    }


def flux_lora_graph(files, t5_config, weight_dtype, lora_name, prefix):
    """One prompt: the base image, LoraLoaderModelOnly at 0 and 1, LoraLoader at 1 (model and clip);
    returns (graph, {label: SaveImage node id})."""
    g = loaders(files, t5_config, weight_dtype, 300)
    model, clip, vae = ["300", 0], ["301", 0], ["302", 0]
    g["310"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora_name,
                                                                "strength_model": 0.0}}
    g["311"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora_name,
                                                                "strength_model": 1.0}}
    g["312"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                                       "strength_model": 1.0, "strength_clip": 1.0}}
    branches = {"base": (model, clip), "model_only_0": (["310", 0], clip), "model_only_1": (["311", 0], clip),
                "lora_loader_1": (["312", 0], ["312", 1])}
    saves = {}
    for i, (label, (m, c)) in enumerate(branches.items()):
        start = 320 + 10 * i
        g.update(flux_sample(f"{prefix}_{label}", m, c, vae, start))
        saves[label] = str(start + 6)
    return g, saves


def flux_base_graph(files, t5_config, weight_dtype, prefix):
    g = loaders(files, t5_config, weight_dtype, 300)
    g.update(flux_sample(prefix, ["300", 0], ["301", 0], ["302", 0], 320))
    return g, "326"


def flux_fingerprint_graph(files, t5_config, weight_dtype):
    """The probe pack's HostFingerprint on the loaded Flux, its CLIP and VAE; the text is node 211's."""
    g = loaders(files, t5_config, weight_dtype, 200)
    g["211"] = {"class_type": "InplaceLoRATest_HostFingerprint",
                "inputs": {"model": ["200", 0], "clip": ["201", 0], "vae": ["202", 0]}}
    return g
