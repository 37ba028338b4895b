"""Just enough of ComfyUI for `nodes.comfy_adapter.ComfyModel` on the CPU test box (no ComfyUI there).

`install(monkeypatch)` puts fake `comfy.model_sampling` and `comfy.model_management` modules into
sys.modules; `comfy_objects(tiny)` wraps one of the engine's tiny diffusers models as ComfyUI hands
them to a node: a MODEL (ModelPatcher-like, its `model` a `BaseModel`/`SDXL` with an LDM-named
`diffusion_model` of class `UNetModel`, a `unet_config`, a `model_sampling` with the model's sigmas and
an EPS or V_PREDICTION kind, a latent format and SDXL's size embedder), a CLIP (`cond_stage_model` with
`clip_l` / `clip_g` holders, `tokenize` in 77-token chunks, `encode_from_tokens`) and a VAE. The LDM
tree shares its Linear/Conv2d modules with the diffusers UNet that computes, as ComfyUI's UNetModel
holds the same layers. The real classes are tested against a real ComfyUI in tests/hosts/comfyui/.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from engine.families import get_family
from engine.families.unet import UNetLayout, diffusers_to_ldm
from engine.models.clip_tokenizer import MAX_LENGTH, tokenize


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    node = root
    for part in path.split(".")[:-1]:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(path.split(".")[-1], module)


# --- comfy.model_sampling ---------------------------------------------------------------------------

class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class X0(EPS):
    pass


class EDM(V_PREDICTION):
    pass


class ModelSamplingDiscrete(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log()[:, None] - self.sigmas.log()[None, :]
        return dists.abs().argmin(dim=1).view(sigma.shape)


class ModelSamplingDiscreteEDM(ModelSamplingDiscrete):
    pass


class StableCascadeSampling(ModelSamplingDiscrete):
    pass


def install(monkeypatch) -> None:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    sampling = types.ModuleType("comfy.model_sampling")
    for cls in (EPS, V_PREDICTION, X0, EDM, ModelSamplingDiscrete, ModelSamplingDiscreteEDM, StableCascadeSampling):
        setattr(sampling, cls.__name__, cls)
    management = types.ModuleType("comfy.model_management")
    management.loaded = []
    management.load_models_gpu = lambda models, **kw: management.loaded.append(list(models))
    comfy.model_sampling, comfy.model_management = sampling, management
    for name, module in (("comfy", comfy), ("comfy.model_sampling", sampling),
                         ("comfy.model_management", management)):
        monkeypatch.setitem(sys.modules, name, module)


# --- MODEL --------------------------------------------------------------------------------------------

def unet_config(config, family: str) -> dict:
    """ComfyUI's unet_config for a diffusers UNet config (the keys the adapter and its layout read). The
    context width is the full-size family's, which is what ComfyUI's detection tells SD1 and SD2 by."""
    levels, per = len(config.block_out_channels), int(config.layers_per_block)
    depth = config.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    down = [depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(config.down_block_types) for _ in range(per)]
    up = [depth[levels - 1 - b] if "CrossAttn" in t else 0 for b, t in enumerate(config.up_block_types)
          for _ in range(per + 1)]
    return {"num_res_blocks": [per] * levels, "channel_mult": list(range(1, levels + 1)), "transformer_depth": down,
            "transformer_depth_output": up[::-1], "transformer_depth_middle": depth[-1], "in_channels": 4,
            "context_dim": get_family(family).context_dim}


class UNetModel(nn.Module):
    """LDM-named Linear/Conv2d children (shared with the diffusers UNet, kept outside the tree)."""

    def __init__(self, unet: nn.Module, layout: UNetLayout, sdxl: bool):
        super().__init__()
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _place(self, diffusers_to_ldm(name, layout), module)
        object.__setattr__(self, "impl", unet)
        self.sdxl = sdxl

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None):
        added = None
        if self.sdxl:  # y = pooled text, then the six size ids (the fake embedder passes them through)
            pooled = y.shape[1] - 6
            added = {"text_embeds": y[:, :pooled], "time_ids": y[:, pooled:]}
        return self.impl(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample


class LatentFormat:
    def __init__(self, scale: float):
        self.scale_factor = scale

    def process_in(self, latents):
        return latents * self.scale_factor


class BaseModel(nn.Module):
    def __init__(self, tiny, kind):
        super().__init__()
        sdxl = tiny.info.family == "sdxl"
        self.model_config = type("SD15" if not sdxl else "SDXL", (), {})()
        self.model_config.unet_config = unet_config(tiny.unet.config, tiny.info.family)
        self.diffusion_model = UNetModel(tiny.unet, tiny.info.layout, sdxl)
        self.model_sampling = type("ModelSampling", (ModelSamplingDiscrete, kind), {})(
            tiny.objective().alphas_cumprod)
        self.latent_format = LatentFormat(tiny.vae.config.scaling_factor)
        self.manual_cast_dtype = None
        self.embedder = lambda ids: ids  # ComfyUI's Timestep(256); here the raw ids reach the fake UNetModel

    def get_dtype(self):
        return torch.float32


class SDXL(BaseModel):
    pass


class ModelPatcher:
    def __init__(self, model):
        self.model, self.load_device = model, torch.device("cpu")

    def get_model_object(self, name):
        return getattr(self.model, name)


# --- CLIP and VAE ---------------------------------------------------------------------------------------

class Holder(nn.Module):
    """`clip_l` & co.: the text model as `transformer`, whose layers ComfyUI names `text_model.encoder...`
    (transformers >= 5.6 builds CLIPTextModel without `text_model`; ComfyUI's own class keeps it)."""

    def __init__(self, te):
        super().__init__()
        if hasattr(te, "text_model"):
            self.transformer = te
        else:
            self.transformer = nn.Module()
            self.transformer.text_model = te
            self.transformer.forward = te.forward


class CLIP:
    """ComfyUI's CLIP: `tokenize` -> 77-token chunks per encoder, `encode_from_tokens` -> cond (+ pooled)."""

    def __init__(self, tiny):
        self.sdxl = tiny.info.family == "sdxl"
        names = ("clip_l", "clip_g") if self.sdxl else ("clip_h",) if tiny.info.family == "sd2" else ("clip_l",)
        self.cond_stage_model = nn.Module()
        for name, te in zip(names, tiny.text_encoders):
            self.cond_stage_model.add_module(name, Holder(te))
        self.keys = [n[-1] for n in names]
        self.tokenizers, self.pad_ids = tiny.tokenizers, tiny.pad_ids
        self.layer_idx, self.patcher = None, object()

    def tokenize(self, text: str) -> dict:
        out = {}
        for key, tok, pad in zip(self.keys, self.tokenizers, self.pad_ids):
            ids = tokenize(tok, [text], pad)[0].tolist()
            out[key] = [ids[:MAX_LENGTH]]
        return out

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False) -> dict:
        hidden, pooled = [], None
        for key, holder in zip(self.keys, self.cond_stage_model.children()):
            ids = torch.tensor(tokens[key])
            out = holder.transformer(ids, output_hidden_states=True)
            states = out.hidden_states[-2] if self.sdxl else out.last_hidden_state
            hidden.append(states.reshape(1, -1, states.shape[-1]))
            if self.sdxl and key == "g":
                pooled = out.text_embeds[:1]
        return {"cond": torch.cat(hidden, dim=-1), "pooled_output": pooled}


class VAE:
    def __init__(self, tiny):
        self.first_stage_model, self.patcher = tiny.vae, object()

    def encode(self, images):  # BHWC in [0, 1] -> unscaled latents
        pixels = images.movedim(-1, 1) * 2 - 1
        return self.first_stage_model.encode(pixels).latent_dist.mean


def comfy_objects(tiny, *, v_prediction: bool = False):
    """(MODEL, CLIP, VAE) over one of the engine's tiny diffusers models."""
    base = (SDXL if tiny.info.family == "sdxl" else BaseModel)(tiny, V_PREDICTION if v_prediction else EPS)
    return ModelPatcher(base), CLIP(tiny), VAE(tiny)


def fingerprint_roots(mp, clip, vae) -> list[nn.Module]:
    """Every module the host owns, for the bit-identical check (the diffusers UNet computes, outside the tree)."""
    return [mp.model.diffusion_model, mp.model.diffusion_model.impl, clip.cond_stage_model, vae.first_stage_model]
