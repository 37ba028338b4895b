"""`A1111Model`: the WebUI's loaded checkpoint (`shared.sd_model`) driven through the engine's seam.

SD1.x/SD2.x are ldm `LatentDiffusion`, SDXL is sgm `DiffusionEngine`; both keep the UNet at
`sd_model.model.diffusion_model` with LDM names (`input_blocks.1.1...`), which `ldm_to_diffusers`
turns into the diffusers names kohya keys are made from. Text goes through A1111's hijack wrappers
(`cond_stage_model` / `conditioner.embedders`), so captions are encoded exactly as prompts are, with
emphasis parsing off; the trainable text-encoder layers are the wrapped HF CLIP (`.wrapped.transformer`)
or OpenCLIP (`.wrapped.model`, fused attention through `fused_attention`). Latents are the VAE's mean
(no sampling: cached latents stay exact), the schedule is recomputed exactly (the checkpoint's fp16
buffer is rounded), and `session()` puts back every flag it touches: requires_grad, modes, options,
`is_trainable`, checkpointing and attention wrappers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from engine.errors import ModelError
from engine.families import get_family
from engine.families.unet import SD_LAYOUT, SDXL_LAYOUT, ldm_to_diffusers
from engine.hostkit.ldm_names import layout_from_ldm_names
from engine.model import Conditioning, ModelInfo, TrainableModel, preserve_module_state
from engine.models.module_state import temporarily_float32
from engine.objectives import DDPMObjective, scaled_linear_alphas_cumprod

from . import host
from .checkpointing import block_checkpointing
from .fused_attention import SLOTS, FusedAttentionLoRA

CHUNK = 77  # one CLIP window; longer captions are cut here, as kohya does by default
SIZE_SLICES = {"original_size_as_tuple": slice(0, 2), "crop_coords_top_left": slice(2, 4),
               "target_size_as_tuple": slice(4, 6)}
_MISSING = object()


def model_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd1"


def exact_alphas_cumprod(sd_model, steps: int = 1000) -> torch.Tensor:
    """The scaled-linear DDPM schedule in float64 -> float32, from the model's own constants."""
    return scaled_linear_alphas_cumprod(float(getattr(sd_model, "linear_start", 0.00085)),
                                        float(getattr(sd_model, "linear_end", 0.012)),
                                        int(getattr(sd_model, "num_timesteps", steps)))


def text_encoders(sd_model, family: str) -> list[tuple[str, nn.Module, nn.Module]]:
    """(kohya prefix, trainable tower, A1111's wrapper) per text encoder of the family: SDXL's are the
    conditioner's text embedders, the others' the one `cond_stage_model`."""
    if family == "sdxl":
        wrappers = [e for e in sd_model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]
    else:
        wrappers = [sd_model.cond_stage_model]
    return [(te.kohya_prefix, _tower(w), w) for te, w in zip(get_family(family).text_encoders, wrappers)]


def _tower(wrapper) -> nn.Module:
    inner = getattr(wrapper, "wrapped", wrapper)
    for attr in ("transformer", "model"):  # HF CLIPTextModel / OpenCLIP model
        tower = getattr(inner, attr, None)
        if isinstance(tower, nn.Module):
            return tower
    raise ModelError(f"unexpected text encoder {type(inner).__name__}: the trainer knows A1111's CLIP and OpenCLIP "
                     f"wrappers (SD1.x, SD2.x, SDXL).")


def openclip_depth(wrapper, tower: nn.Module) -> int:
    """Blocks the encoder runs: SD2 stops before the last one (penultimate layer, and the HF conversion
    kohya names keys from has 23 layers); SDXL's second encoder runs all 32 for its pooled output."""
    inner = getattr(wrapper, "wrapped", wrapper)
    n = len(tower.transformer.resblocks)
    return n if getattr(inner, "return_pooled", False) else n - int(getattr(inner, "layer_idx", 0) or 0)


def is_openclip(tower: nn.Module) -> bool:
    return hasattr(getattr(tower, "transformer", None), "resblocks")


@contextlib.contextmanager
def temporary_attr(obj, name: str, value):
    old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def temporary_option(opts, key: str, value):
    """Set a WebUI option in memory only (never saved, allowed with --freeze-settings)."""
    data = getattr(opts, "data", None)
    if data is None:
        yield
        return
    old = data.get(key, _MISSING)
    if value is _MISSING:
        data.pop(key, None)
    else:
        data[key] = value
    try:
        yield
    finally:
        if old is _MISSING:
            data.pop(key, None)
        else:
            data[key] = old


class A1111Model(TrainableModel):
    def __init__(self, sd_model, *, clip_skip: int = 0):
        from modules import devices

        self.sd = sd_model
        self.family = model_family(sd_model)
        self.unet = sd_model.model.diffusion_model
        self.device = torch.device(devices.device)
        self.dtype = getattr(devices, "dtype_unet", None) or next(self.unet.parameters()).dtype
        v = getattr(sd_model, "parameterization", "eps") == "v"
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.info = ModelInfo(family=self.family, prediction_type="v_prediction" if v else "epsilon",
                              name=getattr(info, "model_name", "") or "", sha256=getattr(info, "sha256", None),
                              layout=layout_from_ldm_names((n for n, _ in self.unet.named_modules()),
                                                           SDXL_LAYOUT if self.family == "sdxl" else SD_LAYOUT),
                              clip_skip=clip_skip or None)
        self.clip_skip = clip_skip
        self.towers = text_encoders(sd_model, self.family)
        self.fused = FusedAttentionLoRA()

    # --- layers ------------------------------------------------------------------------------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                yield ldm_to_diffusers(name, self.info.layout), module

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        for prefix, tower, wrapper in self.towers:
            if is_openclip(tower):
                yield from self._openclip_layers(prefix, tower, openclip_depth(wrapper, tower))
                continue
            wrap = "" if hasattr(tower, "text_model") else "text_model."
            for name, module in tower.named_modules():
                if isinstance(module, nn.Linear):
                    yield prefix, (name if name == "text_projection" else wrap + name), module

    def _openclip_layers(self, prefix: str, tower: nn.Module, depth: int):
        """OpenCLIP `resblocks.N.{attn,mlp.c_fc,mlp.c_proj}` under HF names `encoder.layers.N...`."""
        for i, block in enumerate(list(tower.transformer.resblocks)[:depth]):
            base = f"text_model.encoder.layers.{i}"
            for slot, proxy in zip(SLOTS, self.fused.proxies_for(block.attn)):
                yield prefix, f"{base}.self_attn.{slot}", proxy
            yield prefix, f"{base}.mlp.fc1", block.mlp.c_fc
            yield prefix, f"{base}.mlp.fc2", block.mlp.c_proj

    def trainable_roots(self) -> list[nn.Module]:
        return [self.unet] + [tower for _, tower, _ in self.towers]

    def objective(self) -> DDPMObjective:
        """From the ldm/sgm model: its schedule constants, recomputed exactly, and its parameterization."""
        return DDPMObjective(exact_alphas_cumprod(self.sd), self.info.prediction_type)

    def vae_module(self):
        return getattr(self.sd, "first_stage_model", None)  # the VAE A1111 encodes with, a swapped one too

    # --- compute -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mean x scale factor (SD1/2: 0.18215, SDXL: 0.13025), float32. An fp16 VAE
        that overflows (SDXL's does) encodes the batch again in fp32, cast back exactly afterwards."""
        vae = self.sd.first_stage_model
        with self._vae_on_device(vae):
            latents = self._encode(vae, pixels)
            if not torch.isfinite(latents).all() and next(vae.parameters()).dtype == torch.float16:
                with temporarily_float32(vae, True):
                    latents = self._encode(vae, pixels)
        return latents.to(self.device)

    def _encode(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        moments = vae.quant_conv(vae.encoder(pixels.to(param.device, param.dtype)))
        return moments.chunk(2, dim=1)[0].float() * float(self.sd.scale_factor)

    @contextlib.contextmanager
    def _vae_on_device(self, vae: nn.Module):
        """With --medvram the VAE waits on the CPU; bring it over for the encode and send it back."""
        param = next(vae.parameters())
        if param.device == self.device or self.device.type == "cpu":
            yield
            return
        from modules import lowvram

        lowvram.send_everything_to_cpu()
        vae.to(self.device)
        try:
            yield
        finally:
            vae.to(param.device)

    def encode_text(self, captions: list[str]) -> Conditioning:
        captions = [str(c) for c in captions]
        if self.family != "sdxl":
            context = self.sd.get_learned_conditioning(captions)
            return {"context": context[:, :CHUNK]}
        from modules import prompt_parser

        batch = prompt_parser.SdConditioning(captions, width=1024, height=1024)
        out = self.sd.get_learned_conditioning(batch)
        vector = out["vector"]
        return {"context": out["crossattn"][:, :CHUNK], "pooled": vector[:, :vector.shape[1] - self._size_dim()]}

    def _size_embedders(self) -> list[nn.Module]:
        embedders = list(self.sd.conditioner.embedders)
        sizes = [e for e in embedders if getattr(e, "input_key", None) in SIZE_SLICES]
        if len(sizes) != 3 or embedders[-3:] != sizes:
            raise ModelError("this SDXL model's conditioner is not laid out as SDXL base's (text towers, then "
                             "original size, crop and target size); it cannot be trained here.")
        return sizes

    def _size_dim(self) -> int:
        return sum(int(e.outdim) * 2 for e in self._size_embedders())

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from modules import devices

        dtype = getattr(devices, "dtype_unet", self.dtype)
        context = cond["context"].to(self.device, dtype)
        if self.family != "sdxl":
            return self.sd.apply_model(noisy.to(self.device, dtype), timesteps.to(self.device), context)
        time_ids = cond["time_ids"].to(self.device)
        sizes = [e(time_ids[:, SIZE_SLICES[e.input_key]]) for e in self._size_embedders()]
        vector = torch.cat([cond["pooled"].to(self.device, dtype)] + [s.to(dtype) for s in sizes], dim=1)
        return self.sd.apply_model(noisy.to(self.device, dtype), timesteps.to(self.device),
                                   {"crossattn": context, "vector": vector})

    # --- lifetime ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        reason = host.refusal(self.sd, train_text_encoder=train_text_encoder)
        if reason:
            raise ModelError(reason)
        from modules import shared

        with contextlib.ExitStack() as stack:
            stack.enter_context(preserve_module_state([self.sd]))
            self.sd.requires_grad_(False)  # A1111 leaves the UNet's parameters requiring grad
            changes = {"emphasis": "None"}
            if self.clip_skip:
                changes["CLIP_stop_at_last_layers"] = self.clip_skip
            data = getattr(shared.opts, "data", None) or {}
            self._user_options = {key: data.get(key, _MISSING) for key in changes}
            for key, value in changes.items():
                stack.enter_context(temporary_option(shared.opts, key, value))
            stack.enter_context(_hijack_notes_kept())
            if train_text_encoder and self.family == "sdxl":
                for embedder in self.sd.conditioner.embedders:
                    if getattr(embedder, "input_key", None) == "txt":
                        stack.enter_context(temporary_attr(embedder, "is_trainable", True))
            if gradient_checkpointing:
                stack.enter_context(block_checkpointing(self.unet))
            if train_text_encoder:
                for _ in self.text_encoder_layers():  # creates the fused-attention proxies to wrap
                    pass
                stack.enter_context(self.fused.installed())
            yield self

    # --- previews -------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "") -> list:
        """Previews with A1111's own sampler and the LoRA hooks as attached (no file, no cache), with the
        user's own prompt options rather than the ones set for encoding captions."""
        from modules import shared

        from .previews import txt2img_images

        with contextlib.ExitStack() as stack:
            for key, value in getattr(self, "_user_options", {}).items():
                stack.enter_context(temporary_option(shared.opts, key, value))
            return txt2img_images(prompts, negative=negative, seed=seed, steps=steps, cfg=cfg, width=width,
                                  height=height)


@contextlib.contextmanager
def _hijack_notes_kept():
    """Encoding captions adds notes (Emphasis, TI hashes) to the hijack; the next generation must not
    inherit them."""
    try:
        from modules import sd_hijack

        hijack = sd_hijack.model_hijack
        params, comments = dict(hijack.extra_generation_params), list(hijack.comments)
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        hijack.extra_generation_params.clear()
        hijack.extra_generation_params.update(params)
        hijack.comments[:] = comments
