"""A stand-in for Forge and its forks, on top of the fake WebUI (fake_webui.py), for CI.

`install(monkeypatch, webui, lineage)` adds what the Forge adapter imports: `modules_forge` (with
`forge_version`), the fork's model manager (`backend.memory_management` for Forge/Neo,
`ldm_patched.modules.model_management` for reForge/Classic) and a `networks` module shaped like
`sd_forge_lora`'s (LoRA hash, `load_lora_state_dict` lru cache, `load_networks`).

`forge_model(webui, family, lineage)` builds `shared.sd_model` the way the forks hold it:
`forge_objects.unet` is a ComfyUI-like patcher whose `.model.diffusion_model` is an LDM-named tree
over an engine tiny UNet (called ComfyUI's way: `(x, timesteps, context=, y=)`), `forge_objects.clip`
holds `clip_l`/`clip_g` with `.transformer`, `forge_objects.vae` encodes BHWC pixels. Every weight is
an inference tensor, as Forge loads them. On the "backend" lineage (Forge 2.x, Neo) every Linear is
replaced by `ForgeLinear`, an nn.Module that is not an nn.Linear (as `backend.operations` builds
them), and text goes through `text_processing_engine*`; on "ldm_patched" (reForge, Classic) through
A1111's `get_learned_conditioning` (the fake A1111 models' hijack wrappers).
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from engine.families.unet import diffusers_to_ldm
from engine.families.unet import UNetLayout
from engine.models import tiny_sd1, tiny_sdxl
from engine.models.clip_tokenizer import tokenize
from fake_models import FakeSD1, FakeSDXL, place


class ForgeLinear(nn.Module):
    """backend.operations.ForgeOperations.Linear: in/out features, weight, bias; not an nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.parameters_manual_cast = False

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def forge_linears(root: nn.Module) -> int:
    """Swap every nn.Linear under `root` for a ForgeLinear sharing its parameters."""
    swaps = [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, ForgeLinear(child))
    return len(swaps)


def as_inference_tensors(root: nn.Module) -> None:
    """Re-create every parameter and buffer under inference mode, as Forge's loader does."""
    with torch.inference_mode():
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()


class Blocks(nn.Module):
    """`input_blocks` / `output_blocks`: iterable like the ModuleList the real UNet has."""

    def __iter__(self):
        return iter(self._modules.values())


class LdmUNet(nn.Module):
    """The LDM-named UNet Forge hangs under KModel/BaseModel, computing with the tiny diffusers UNet."""

    def __init__(self, unet, layout: UNetLayout, sdxl: bool):
        super().__init__()
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, ForgeLinear)):
                place(self, diffusers_to_ldm(name, layout), module)
        for attr in ("input_blocks", "output_blocks"):
            getattr(self, attr).__class__ = Blocks
        self.__dict__["impl"] = unet  # not a submodule: only the LDM names are the model's
        self.sdxl, self.in_channels = sdxl, 4
        self.calls = 0

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None):
        self.calls += 1
        added = {"text_embeds": y[:, :-6], "time_ids": y[:, -6:]} if self.sdxl else None
        return self.impl(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample


class Patcher:
    """The parts of Forge's/ComfyUI's ModelPatcher the adapter and the fork's LoRA code use."""

    def __init__(self, model, lora_patches=None):
        self.model, self.load_device, self.offload_device = model, torch.device("cpu"), torch.device("cpu")
        self.lora_patches = dict(lora_patches or {})
        self.refreshed = 0

    def clone(self):
        return Patcher(self.model, self.lora_patches)

    def refresh_loras(self):
        assert torch.is_inference_mode_enabled()  # Forge's LoraLoader.refresh runs under inference mode
        self.refreshed += 1

    def model_size(self):
        return 100

    def loaded_size(self):
        return 100


class ForgeObjects(SimpleNamespace):
    def shallow_copy(self):
        return ForgeObjects(unet=self.unet, clip=self.clip, vae=self.vae, clipvision=None)


class FakeVAE:
    """Forge's VAE object: `encode` takes BHWC in 0..1 and returns unscaled latents (the mean)."""

    def __init__(self, vae, scale: float):
        self.first_stage_model = vae
        self.first_stage_model.process_in = lambda latents: latents * scale
        self.patcher = Patcher(vae)

    def encode(self, pixels):
        x = pixels.movedim(-1, 1) * 2 - 1
        return self.first_stage_model.encode(x).latent_dist.mean


class TextEngine:
    """backend's ClassicTextProcessingEngine: texts -> (B, 77*chunks, dim) (+ pooled), two chunks here."""

    def __init__(self, holder, tokenizer, pad_id: int, opts, pooled: bool = False):
        self.text_encoder, self.tokenizer, self.pad_id, self.opts, self.pooled = holder, tokenizer, pad_id, opts, pooled
        self.clip_skip = 1
        self.seen: list[tuple[str, int]] = []

    def __call__(self, texts):
        self.seen.append((self.opts.data.get("emphasis"), self.clip_skip))
        out = self.text_encoder.transformer(tokenize(self.tokenizer, list(texts), self.pad_id))
        z = torch.cat([out.last_hidden_state, out.last_hidden_state.flip(1)], dim=1)
        return (z, out.text_embeds) if self.pooled else z


def forge_model(webui, family: str = "sd1", lineage: str = "backend", seed: int = 0):
    """A model as the fork holds it in `shared.sd_model` (see the module docstring)."""
    opts = webui.shared.opts
    if lineage == "ldm_patched":  # A1111's ldm/sgm model around the forge objects' modules
        sd = (FakeSDXL if family == "sdxl" else FakeSD1)(opts, seed)
        tiny = SimpleNamespace(unet=sd.model.unet_impl, vae=sd.first_stage_model,
                               text_encoders=[w.wrapped.transformer for w in _wrappers(sd)])
    else:
        tiny = (tiny_sdxl if family == "sdxl" else tiny_sd1)(seed)
        sd = SimpleNamespace(is_sd1=family == "sd1", is_sd2=False, is_sdxl=family == "sdxl", is_sd3=False)
        sd.sd_checkpoint_info = SimpleNamespace(model_name=f"tiny-{family}", sha256="cd" * 32)
        for module in [tiny.unet, *tiny.text_encoders]:
            forge_linears(module)
    layout = UNetLayout.from_diffusers_config(tiny.unet.config)
    base = nn.Module()
    base.diffusion_model = LdmUNet(tiny.unet, layout, family == "sdxl")
    base.storage_dtype = base.computation_dtype = torch.float32
    base.embedder = lambda ids: ids.float()  # the size ids as they are: LdmUNet reads them back from y
    if lineage == "ldm_patched":
        sd.model.diffusion_model = base.diffusion_model  # reForge points A1111's wrapper at the forge UNet
    cond_stage = nn.Module()
    for key, te in zip(("clip_l", "clip_g"), tiny.text_encoders):
        holder = nn.Module()
        holder.transformer = te
        cond_stage.add_module(key, holder)
    if lineage == "ldm_patched":
        from diffusers import DDPMScheduler

        ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
        base.model_sampling = type("ModelSamplingDiscrete", (_Mixin("EPS"),), {})()
        base.model_sampling.sigmas = ((1 - ac) / ac) ** 0.5
    else:
        predictor = SimpleNamespace(prediction_type="epsilon")
        from diffusers import DDPMScheduler

        ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
        predictor.sigmas = ((1 - ac) / ac) ** 0.5
        base.predictor = predictor
        engines = [TextEngine(getattr(cond_stage, k), tok, pad, opts, pooled=k == "clip_g")
                   for k, tok, pad in zip(("clip_l", "clip_g"), tiny.tokenizers, tiny.pad_ids)]
        if family == "sdxl":
            sd.text_processing_engine_l, sd.text_processing_engine_g = engines
        else:
            sd.text_processing_engine = engines[0]
    for root in (base, cond_stage, tiny.vae):
        as_inference_tensors(root)
    clip = SimpleNamespace(cond_stage_model=cond_stage, patcher=Patcher(cond_stage))
    vae = FakeVAE(tiny.vae, 0.13025 if family == "sdxl" else 0.18215)
    sd.forge_objects = ForgeObjects(unet=Patcher(base), clip=clip, vae=vae, clipvision=None)
    sd.forge_objects_original = sd.forge_objects.shallow_copy()
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()
    sd.current_lora_hash = str([])
    sd.render = functools.partial(_render, sd)
    webui.shared.sd_model = webui.sd_models.model_data.sd_model = sd
    return sd


def _wrappers(sd):
    return list(sd.conditioner.embedders)[:2] if hasattr(sd, "conditioner") else [sd.cond_stage_model]


def _Mixin(name):
    return type(name, (), {})


def _render(sd, prompt: str, *, seed: int, width: int, height: int):
    """What the fake process_images draws on Forge: one UNet call through the forge objects."""
    import numpy as np
    from PIL import Image

    unet = sd.forge_objects.unet.model.diffusion_model
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(1, 4, height // 8, width // 8, generator=g)
    context = torch.zeros(1, 77, unet.impl.config.cross_attention_dim)
    y = torch.zeros(1, unet.impl.config.projection_class_embeddings_input_dim) if unet.sdxl else None
    with torch.inference_mode():
        out = unet(x, torch.tensor([500.0]), context=context, y=y)
    arr = ((out[0, :3].permute(1, 2, 0).numpy() * 40 + 128).clip(0, 255)).astype(np.uint8)
    return Image.fromarray(arr).resize((width, height))


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    return module


def install(monkeypatch, webui, lineage: str = "backend", version: str = "2.0.1v1.10.1") -> SimpleNamespace:
    """Make the fake WebUI a Forge of `lineage`; returns the fork's fake modules."""
    if lineage == "backend":
        parent, name = "backend", "backend.memory_management"
    else:
        parent, name = "ldm_patched.modules", "ldm_patched.modules.model_management"
    mm = _module(name, vram_state=SimpleNamespace(name="NORMAL_VRAM"), current_loaded_models=[],
                 ALWAYS_VRAM_OFFLOAD=False, loads=[], partial=False)

    def load_models_gpu(models, memory_required=0, force_full_load=False):
        """Records the call; `partial` makes it load the UNet partly, as with too little free VRAM."""
        mm.loads.append(list(models))
        mm.current_loaded_models[:] = [SimpleNamespace(model=m, model_accelerated=mm.partial) for m in models]

    mm.load_models_gpu = load_models_gpu
    mods = {"modules_forge": _module("modules_forge"),
            "modules_forge.forge_version": _module("modules_forge.forge_version", version=version), name: mm}
    parts = parent.split(".")
    for i in range(len(parts)):
        pkg = ".".join(parts[:i + 1])
        mods.setdefault(pkg, _module(pkg))
    setattr(mods[parent], name.rsplit(".", 1)[1], mm)
    mods["modules_forge"].forge_version = mods["modules_forge.forge_version"]
    if lineage == "ldm_patched":
        mods["ldm_patched"].modules = mods["ldm_patched.modules"]
    mods["networks"] = make_forge_networks(webui)
    if lineage == "ldm_patched":  # reForge reads p.scripts.alwayson_scripts in process_images, unguarded
        mods["modules.scripts"] = _module("modules.scripts", ScriptRunner=lambda: SimpleNamespace(alwayson_scripts=[]))
        monkeypatch.setattr(webui.modules, "scripts", mods["modules.scripts"], raising=False)
        render = webui.processing.process_images

        def process_images(p):
            [s for s in p.scripts.alwayson_scripts if s.name == "advanced model sampling for reforge"]
            return render(p)

        monkeypatch.setattr(webui.processing, "process_images", process_images)
    for key, module in mods.items():
        monkeypatch.setitem(sys.modules, key, module)
    return SimpleNamespace(memory=mm, networks=mods["networks"])


def make_forge_networks(webui) -> types.ModuleType:
    """sd_forge_lora's networks module: what `load_networks` leaves behind after a `<lora:...>` prompt."""
    net = _module("networks", loaded_networks=[], refreshed=[0])

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename):
        return filename

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        sd = webui.shared.sd_model
        net.loaded_networks[:] = [SimpleNamespace(name=n) for n in names]
        for n in names:
            load_lora_state_dict(n)
        sd.current_lora_hash = str(names)
        sd.forge_objects.unet = sd.forge_objects_original.unet.clone()
        sd.forge_objects.unet.lora_patches = {n: {} for n in names}

    def list_available_networks():
        net.refreshed[0] += 1

    net.load_lora_state_dict, net.load_networks = load_lora_state_dict, load_networks
    net.list_available_networks = list_available_networks
    return net
