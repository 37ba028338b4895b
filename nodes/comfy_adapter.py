"""`ComfyModel`: ComfyUI's loaded MODEL / CLIP / VAE driven through the engine's seam.

Nothing is copied or reloaded: the engine's LoRA hooks sit on ComfyUI's own Linear/Conv2d modules,
images go through ComfyUI's VAE, captions through its CLIP (clip skip and all), and `predict` calls
the UNet directly with the DDPM-form input and integer timesteps, which is what ComfyUI's
`model_sampling` computes from sigmas (`x/sqrt(1+sigma^2)`, `alphas_cumprod = 1/(1+sigma^2)`): the
objective comes from `model_sampling` (its sigmas and its EPS / V_PREDICTION kind). LDM names and CLIP
holders are mapped by engine/hostkit, shared with the other LDM hosts. `session()` loads the models the
ComfyUI way and puts every tensor and flag back afterwards (engine/hostkit/borrowing.py). comfy is
imported lazily, so this module imports outside ComfyUI too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..engine.errors import ModelError
from ..engine.hostkit.borrowing import borrowed_weights, clip_backprop_guard, unet_blocks
from ..engine.hostkit.clip_holders import text_encoder_layers, text_encoders
from ..engine.hostkit.ldm_names import layout_from_unet_config, unet_layers
from ..engine.model import Conditioning, ModelInfo, TrainableModel
from ..engine.models.fp8_host import host_fp8_casts
from ..engine.models.module_state import checkpointed_forwards, recompute_units
from ..engine.objectives import DDPMObjective


def _refuse(what: str) -> ModelError:
    return ModelError(f"{what} This trainer supports SD1.x, SD2.x and SDXL checkpoints (eps or v-prediction). "
                      f"Load one with Load Checkpoint and connect its MODEL, CLIP and VAE.")


def detect_family(model_patcher) -> str:
    """"sd1" | "sd2" | "sdxl" for the MODEL, or a ModelError that names what was connected."""
    base = model_patcher.model
    config_name = type(getattr(base, "model_config", None)).__name__
    kind = type(base).__name__
    dm = getattr(base, "diffusion_model", None)
    if type(dm).__name__ != "UNetModel" or kind not in ("BaseModel", "SDXL"):
        raise _refuse(f"The MODEL is a {config_name} model ({kind}), which cannot be trained here.")
    unet_config = base.model_config.unet_config
    if unet_config.get("in_channels", 4) != 4:
        raise _refuse(f"The MODEL is an inpainting/instruct {config_name} model (its UNet takes "
                      f"{unet_config.get('in_channels')} input channels), which cannot be trained here.")
    if kind == "SDXL":
        return "sdxl"
    context = unet_config.get("context_dim")
    if context == 768:
        return "sd1"
    if context == 1024:
        return "sd2"
    raise _refuse(f"The MODEL is a {config_name} UNet with {context}-wide cross-attention, which is not SD1/SD2.")


def prediction_type(model_sampling) -> str:
    """"epsilon" | "v_prediction" from ComfyUI's model_sampling object (mixin + schedule class)."""
    import comfy.model_sampling as cms

    schedule_ok = isinstance(model_sampling, cms.ModelSamplingDiscrete) and not isinstance(
        model_sampling, (cms.ModelSamplingDiscreteEDM, cms.StableCascadeSampling))
    name = "+".join(b.__name__ for b in type(model_sampling).__bases__)
    if not schedule_ok:
        raise _refuse(f"The MODEL samples with a {name} schedule (EDM, flow or cascade), which cannot be "
                      f"trained here.")
    if isinstance(model_sampling, cms.V_PREDICTION) and not isinstance(model_sampling, cms.EDM):
        return "v_prediction"
    if isinstance(model_sampling, cms.EPS) and not isinstance(model_sampling, (cms.V_PREDICTION, cms.X0)):
        return "epsilon"
    raise _refuse(f"The MODEL predicts with {name}, neither eps nor v.")


def comfy_model(model, clip, vae, *, name: str = "") -> "ComfyModel":
    """The adapter for what is connected: ComfyUI's Flux.1 (nodes/comfy_flux.py) or an SD checkpoint."""
    from .comfy_flux import ComfyFluxModel, is_flux

    if is_flux(model):
        return ComfyFluxModel(model, clip, vae, name=name)
    return ComfyModel(model, clip, vae, name=name)


def escape_caption(text: str) -> str:
    """Captions are literal: ComfyUI's tokenizer would read `(word:1.2)` as a weight."""
    return str(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


class ComfyModel(TrainableModel):
    """ComfyUI's MODEL (ModelPatcher), CLIP and VAE as a `TrainableModel`."""

    max_token_windows = 3  # max_token_length up to 225, in ComfyUI's own 77-token chunks (`_windows`)

    def __init__(self, model, clip, vae, *, name: str = ""):
        if model is None or clip is None or vae is None:
            raise ModelError("LoRA Trainer needs MODEL, CLIP and VAE connected (from Load Checkpoint).")
        self.mp, self.clip, self.vae = model, clip, vae
        base = model.model
        family = detect_family(model)
        sampling = model.get_model_object("model_sampling")
        prediction = prediction_type(sampling)
        sigmas = sampling.sigmas.detach().float().cpu()
        steps = torch.arange(len(sigmas), dtype=torch.float32)
        if not torch.allclose(sampling.timestep(sigmas).float().cpu(), steps, atol=0.5):
            raise _refuse("The MODEL's sampling schedule was changed (e.g. ModelSamplingDiscrete 'lcm'); "
                          "connect the MODEL straight from Load Checkpoint.")
        self._sigmas = sigmas
        layout = layout_from_unet_config(base.model_config.unet_config)
        self._unet = unet_layers(base.diffusion_model, layout)
        self._encoders = text_encoders(clip.cond_stage_model, family)
        layer_idx = getattr(clip, "layer_idx", None)
        clip_skip = -layer_idx if family != "sdxl" and isinstance(layer_idx, int) and layer_idx < -1 else None
        self.info = ModelInfo(family=family, prediction_type=prediction, name=name, layout=layout,
                              clip_skip=clip_skip)
        self.device = torch.device(model.load_device)
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.sampler_name, self.scheduler = "euler", "normal"

    @property
    def family_name(self) -> str:
        return self.info.spec.display_name

    # --- layers -----------------------------------------------------------------------------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._unet)

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        return text_encoder_layers(self._encoders)

    def text_models(self) -> list[nn.Module]:
        return [te for _, te, _ in self._encoders]

    def trainable_roots(self) -> list[nn.Module]:
        return [self.mp.model.diffusion_model, *self.text_models()]

    def objective(self) -> DDPMObjective:
        """From `model_sampling`: the DDPM schedule its sigmas encode and its prediction kind."""
        return DDPMObjective(1.0 / (1.0 + self._sigmas.double() ** 2).float(), self.info.prediction_type)

    def vae_module(self):
        return getattr(self.vae, "first_stage_model", None)

    # --- compute ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents, through ComfyUI's VAE (which takes BHWC in 0..1)."""
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
        latents = self.vae.encode(images)
        return self.mp.model.latent_format.process_in(latents.float()).to(self.device)

    def _windows(self, tokens: dict) -> dict:
        """Exactly `token_windows` of ComfyUI's chunks per encoder (cut, or padded with the empty
        prompt's chunk), so every caption's conditioning has one shape: the CUDA-graphed step and the
        text cache need that. The layout is ComfyUI's own for long prompts (77-token chunks joined)."""
        n = self.token_windows
        if any(len(chunks) < n for chunks in tokens.values()):
            empty = self.clip.tokenize("")
            tokens = {k: v + [empty[k][0]] * (n - len(v)) for k, v in tokens.items()}
        return {k: v[:n] for k, v in tokens.items()}

    def encode_text(self, captions: list[str]) -> Conditioning:
        contexts, pooled = [], []
        for caption in captions:
            tokens = self._windows(self.clip.tokenize(escape_caption(caption)))
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            contexts.append(out["cond"].to(self.device))
            if out.get("pooled_output") is not None:
                pooled.append(out["pooled_output"].to(self.device))
        cond = {"context": torch.cat(contexts)}
        if "pooled" in self.info.spec.conditioning:
            cond["pooled"] = torch.cat(pooled)
        return cond

    def _sdxl_y(self, cond: Conditioning, batch: int, height: int, width: int) -> torch.Tensor:
        """ComfyUI's SDXL `encode_adm`: pooled text + Timestep(256) of the six size ids, per sample."""
        ids = cond.get("time_ids")
        if ids is None:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
        emb = self.mp.model.embedder(ids.float().to(self.device).flatten()).reshape(ids.shape[0], -1)
        return torch.cat([cond["pooled"].float().to(self.device), emb.to(self.device)], dim=1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dm = self.mp.model.diffusion_model
        x = noisy.to(self.device, self.dtype)
        context = cond["context"].to(self.device, self.dtype)
        y = None
        if self.info.family == "sdxl":
            y = self._sdxl_y(cond, x.shape[0], x.shape[-2] * 8, x.shape[-1] * 8).to(self.dtype)
        return dm(x, timesteps.to(self.device).float(), context=context, y=y, control=None, transformer_options={})

    # --- lifetime -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        import comfy.model_management as mm

        mm.load_models_gpu([self.mp, self.clip.patcher, self.vae.patcher], force_full_load=True)
        unet = self.mp.model.diffusion_model
        swap = [unet] + (self.text_models() if train_text_encoder else [])
        with contextlib.ExitStack() as stack:
            stack.enter_context(borrowed_weights(self.trainable_roots(), swap))
            stack.enter_context(host_fp8_casts(unet))  # fp8 Linears: no bf16 copy kept for backward
            if gradient_checkpointing:
                stack.enter_context(self.checkpointing(train_text_encoder))
            if train_text_encoder:
                stack.enter_context(clip_backprop_guard(self.text_models()))
            yield self

    @contextlib.contextmanager
    def checkpointing(self, train_text_encoder: bool):
        """Checkpointing of the UNet's blocks (the session's, or the out-of-memory recovery's mid-run)."""
        with checkpointed_forwards(recompute_units(unet_blocks(self.mp.model.diffusion_model)), copy_dict_args=True):
            yield

    # --- previews -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "") -> list:
        """Previews through ComfyUI's own sampler, with the LoRA hooks as attached."""
        import comfy.sample
        from PIL import Image

        negative_cond = self._conditioning(negative)
        images = []
        for prompt in prompts:
            latent = torch.zeros([1, 4, height // 8, width // 8])
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(self.mp, noise, steps, cfg, self.sampler_name, self.scheduler,
                                          self._conditioning(prompt), negative_cond, latent, disable_pbar=True,
                                          seed=seed)
            pixels = self.vae.decode(samples)
            for img in pixels.reshape(-1, *pixels.shape[-3:]):
                images.append(Image.fromarray((img.float().clamp(0, 1) * 255).round().byte().cpu().numpy()))
        return images

    def _conditioning(self, text: str) -> list:
        tokens = self.clip.tokenize(text)
        out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return [[cond, out]]
