"""Run with the ComfyUI venv's python: the kohya keys our ComfyUI adapter names for full-size SD1.5 and
SDXL (ComfyUI's own UNet and CLIP classes, built on the meta device), our LDM->diffusers map
checked against comfy.utils.unet_to_diffusers, and ComfyModel's detection/refusals on those classes. Prints JSON; the test compares the keys with the
standalone path's (computed in the test's own venv: diffusers does not import next to the
torchvision stand-in of the CPU ComfyUI venv).

    $COMFYUI_PYTHON tests/hosts/comfyui/keys_probe.py
"""
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
from make_checkpoint import comfy_root  # noqa: E402

SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SD21 = {**SD15, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
SSD1B = {**SDXL, "transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}


def load_pack():
    spec = importlib.util.spec_from_file_location("inplace_pack", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["inplace_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


class Named:
    """Just enough of a TrainableModel for build_network: our ComfyUI naming over ComfyUI modules."""

    def __init__(self, info, unet, encoders, names):
        self.info, self._unet, self._encoders, self._names = info, unet, encoders, names

    def unet_layers(self):
        return iter(self._unet)

    def text_encoder_layers(self):
        return self._names.text_encoder_layers(self._encoders)


def comfy_keys(family, unet_config, pack):
    import torch

    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from inplace_pack.engine.config import TrainConfig
    from inplace_pack.engine.hostkit import clip_holders, ldm_names
    from inplace_pack.engine.lora.targets import build_network
    from inplace_pack.engine.model import ModelInfo

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    base = model_config.get_model({}, device="meta")
    if family == "sdxl":
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    else:
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    layout = ldm_names.layout_from_unet_config(model_config.unet_config)
    unet = ldm_names.unet_layers(base.diffusion_model, layout)
    model = Named(ModelInfo(family=family, layout=layout), unet, clip_holders.text_encoders(clip, family),
                  clip_holders)
    network = build_network(model, TrainConfig.from_dict({"train_text_encoder": True}))
    return sorted(network.loras.keys()), type(model_config).__name__


def name_maps(pack):
    """Per config: (ldm, ours, comfy's) for every UNet weight where our map and comfy's disagree."""
    import comfy.utils
    from inplace_pack.engine.families.unet import ldm_to_diffusers
    from inplace_pack.engine.hostkit.ldm_names import layout_from_unet_config

    out = {}
    for name, cfg in (("SD15", SD15), ("SD21", SD21), ("SDXL", SDXL), ("SSD1B", SSD1B)):
        layout = layout_from_unet_config(cfg)
        d2l = comfy.utils.unet_to_diffusers(cfg)
        checked, mismatches = 0, []
        for diffusers, ldm in d2l.items():
            if not diffusers.endswith(".weight") or diffusers.startswith(("class_embedding", "add_embedding")):
                continue
            if ldm.startswith("input_blocks.") and ".0.op." in ldm and diffusers.startswith("down_blocks.%d." % (
                    len(cfg["channel_mult"]) - 1)):
                continue  # comfy maps a downsampler for the last level, which has none
            ours = ldm_to_diffusers(ldm[: -len(".weight")], layout)
            checked += 1
            if ours != diffusers[: -len(".weight")]:
                mismatches.append([ldm, ours, diffusers])
        out[name] = {"checked": checked, "mismatches": mismatches[:20]}
    return out


FLUX_SMALL = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "patch_size": 2}


def flux_config() -> dict:
    """FLUX_SMALL with the fields newer ComfyUI requires (0.2x added `txt_ids_dims`; Flux.1 has none)."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    config = dict(FLUX_SMALL)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        config.setdefault("txt_ids_dims", [])
    return config


def adapter_checks():
    """ComfyModel on ComfyUI's own model classes (meta device): family / prediction detection, the
    SDXL `y` vector against ComfyUI's encode_adm, and the refusals users see for other models."""
    import types

    import torch

    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from inplace_pack.engine.errors import ModelError
    from inplace_pack.nodes.comfy_adapter import ComfyModel

    cpu = torch.device("cpu")

    def wrap(base, clip_model):
        mp = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
        return mp, types.SimpleNamespace(cond_stage_model=clip_model, layer_idx=None)

    def attempt(mp, clip):
        try:
            m = ComfyModel(mp, clip, object())
            return {"family": m.info.family, "prediction": m.info.prediction_type, "resolution": m.info.resolution}
        except ModelError as exc:
            return {"refused": str(exc)}

    out = {}
    sd1_clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    sdxl = comfy.model_detection.model_config_from_unet_config(dict(SDXL)).get_model({}, device="meta")
    mp, clip = wrap(sdxl, comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16))
    out["sdxl"] = attempt(mp, clip)
    pooled = torch.randn(2, 1280)
    ids = torch.tensor([[1024.0, 768, 0, 16, 1024, 768], [512, 512, 8, 0, 640, 704]])
    ours = ComfyModel(mp, clip, object())._sdxl_y({"pooled": pooled, "time_ids": ids}, 2, 0, 0)
    ref = torch.cat([sdxl.encode_adm(pooled_output=pooled[i:i + 1], height=r[0], width=r[1], crop_h=r[2], crop_w=r[3],
                                     target_height=r[4], target_width=r[5]) for i, r in enumerate(ids.tolist())])
    out["sdxl_y_equal"] = bool(torch.equal(ours, ref))
    sd21 = comfy.model_detection.model_config_from_unet_config(dict(SD21))
    v_model = comfy.model_base.BaseModel(sd21, model_type=comfy.model_base.ModelType.V_PREDICTION, device="meta")
    out["sd2_v"] = attempt(*wrap(v_model, sd1_clip))
    sd15 = comfy.model_detection.model_config_from_unet_config(dict(SD15)).get_model({}, device="meta")
    mp, clip = wrap(sd15, sd1_clip)
    out["sd1"] = attempt(mp, clip)
    lcm = mp.clone()
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    out["sd1_lcm"] = attempt(ModelSamplingDiscrete().patch(lcm, "lcm", False)[0], clip)
    flux = comfy.model_detection.model_config_from_unet_config(flux_config()).get_model({}, device="meta")
    out["flux"] = attempt(*wrap(flux, sd1_clip))
    return out


def main():
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args

    args.cpu = True
    pack = load_pack()
    result = {"maps": name_maps(pack)}
    for family, cfg in (("sd1", SD15), ("sdxl", SDXL)):
        keys, config_name = comfy_keys(family, cfg, pack)
        result[family] = {"keys": keys, "config": config_name}
    result["adapter"] = adapter_checks()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
