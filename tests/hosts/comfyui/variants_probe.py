"""Run with the ComfyUI venv's python: ComfyUI's own LoRA loader (comfy.lora.load_lora and
calculate_weight, what LoraLoader runs) on our LoRA, LoHa, LoKr and DoRA files. Prints JSON.

The model is ComfyUI's SD1.5 UNet and CLIP-L classes at a small width with random weights (layer kinds
and names as the full model: Linear, 1x1 proj_in/out and 3x3 convs with the locon layers, text-encoder
Linears). For each kind, our network is built on those layers the way the trainer builds it, its
factors are moved off their start, and the file is written as the trainer writes it (fp16, dora_scale
float32). ComfyUI then loads the file: every key must be used (no "lora key not loaded"), every module
patched, and each patched weight must equal the base weight plus strength times our hook's update, at
strength 1 and 0.5; strength 0 must leave every weight exactly as it was.

    $COMFYUI_PYTHON tests/hosts/comfyui/variants_probe.py
"""
import json
import logging
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from keys_probe import SD15, Named, load_pack  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402

SMALL_UNET = {**SD15, "model_channels": 32, "num_heads": 4}
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 77, "hidden_act": "quick_gelu", "vocab_size": 49408, "eos_token_id": 49407,
              "bos_token_id": 49406, "projection_dim": 64, "layer_norm_eps": 1e-5}
KINDS = {"lora": {}, "loha": {"network_type": "loha"}, "lokr": {"network_type": "lokr"},
         "lokr_factor": {"network_type": "lokr", "lokr_factor": 4, "decompose_both": True, "lora_rank": 1},
         "dora": {"network_type": "dora"}}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def build_models():
    import torch

    import comfy.sd1_clip
    import comfy.supported_models

    torch.manual_seed(0)
    model_config = comfy.supported_models.SD15(dict(SMALL_UNET))
    base = model_config.get_model({}, device="cpu")
    config = dict(SMALL_CLIP)

    class SmallClip(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(config), model_options=model_options)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32, clip_model=SmallClip)
    with torch.no_grad():
        for root in (base, clip):
            for p in root.parameters():
                p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model_config, base, clip


def check(kind, options, models, tmp):
    import torch

    import comfy.lora
    import comfy.utils
    from inplace_pack.engine.config import TrainConfig
    from inplace_pack.engine.lora.kohya_io import save_lora
    from inplace_pack.engine.lora.targets import build_network
    from inplace_pack.engine.model import ModelInfo
    from inplace_pack.engine.hostkit import clip_holders, ldm_names

    model_config, base, clip = models
    layout = ldm_names.layout_from_unet_config(model_config.unet_config)
    named = Named(ModelInfo(family="sd1", layout=layout), ldm_names.unet_layers(base.diffusion_model, layout),
                  clip_holders.text_encoders(clip, "sd1"), clip_holders)
    cfg = TrainConfig.from_dict({"train_text_encoder": True, "target_modules": "locon", "lora_rank": 4,
                                 "lora_alpha": 2, **options})
    network = build_network(named, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_lora(os.path.join(tmp, f"{kind}.safetensors"), network.kohya_state_dict(), {})
    lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    reread = build_network(named, cfg)  # the file's numbers (fp16-rounded) in our modules
    reread.match_file(lora_sd)
    reread.load_kohya_state_dict(lora_sd)

    key_map = comfy.lora.model_lora_keys_unet(base, {})
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    handler = Warnings()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora_sd, key_map)
        weights = {}
        for name, module in list(base.named_modules()) + list(clip.named_modules()):
            weights[id(module)] = name
        errors, worst, zero_exact, compared = [], 0.0, True, 0
        params = dict(base.named_parameters())
        params.update(clip.named_parameters())
        for key, module in reread.loras.items():
            target = weights[id(reread._bases[key])] + ".weight"
            if target not in patches:
                errors.append(f"{key}: not patched ({target})")
                continue
            w0 = params[target].detach().float()
            delta = module.delta_weight().detach().reshape(w0.shape)
            for strength in (1.0, 0.5, 0.0):
                got = comfy.lora.calculate_weight([(strength, patches[target], 1.0, None, None)], w0.clone(), target)
                if strength == 0.0:
                    zero_exact &= bool(torch.equal(got, w0))
                    continue
                err = float((got - w0 - strength * delta).abs().max() / (delta.abs().max() * strength + 1e-12))
                worst = max(worst, err)
            compared += 1
    finally:
        logging.getLogger().removeHandler(handler)
    return {"modules": len(reread), "patched": len(patches), "compared": compared, "errors": errors[:5],
            "worst_relative_error": worst, "strength0_exact": zero_exact,
            "not_loaded": [m for m in handler.lines if "lora key not loaded" in m][:5],
            "comfy_errors": [m for m in handler.lines if m.startswith("ERROR")][:5],
            "kinds": sorted({k.split(".", 1)[1] for k in lora_sd})}


def main():
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args

    args.cpu = True
    load_pack()
    models = build_models()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({kind: check(kind, options, models, tmp) for kind, options in KINDS.items()}))


if __name__ == "__main__":
    main()
