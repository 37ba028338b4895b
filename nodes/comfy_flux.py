"""`ComfyFluxModel`: ComfyUI's loaded Flux.1 (Load Diffusion Model or Load Checkpoint, bf16 or fp8) driven
through the engine's seam, in place.

The LoRA hooks sit on ComfyUI's own Linear modules of `diffusion_model` (BFL names, kohya's keys). The
forward is the engine's (engine/models/flux_forward.py) over those modules: ComfyUI's Flux blocks add
in place and cannot be backpropagated through, and the engine's forward can, with per-block
checkpointing when asked. ComfyUI's Linears still do their own casting, so weights loaded as
`fp8_e4m3fn` stay fp8 in memory and are cast per layer to the compute dtype (`manual_cast_dtype`:
bf16 on a GPU), and nothing is dequantised into a second copy; for the run, backward keeps each fp8
Linear's fp8 weight rather than its bf16 cast (engine/models/fp8_host.py). Captions go through the loaded CLIP
(DualCLIPLoader clip_l + t5xxl, type flux: T5 hidden states and CLIP-L's pooled output), images through
the loaded VAE and `latent_format.process_in`; conditioning is cached by the run like any other.
Previews use ComfyUI's sampler with the run's sample_guidance in the conditioning, as FluxGuidance sets it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..engine.errors import ModelError
from ..engine.families.flux1 import t5_tokens
from ..engine.hostkit.borrowing import borrowed_weights, clip_backprop_guard
from ..engine.hostkit.clip_holders import text_encoder_layers, text_encoders
from ..engine.model import Conditioning, ModelInfo
from ..engine.models.flux_forward import flux_forward
from ..engine.models.fp8_host import host_fp8_casts
from ..engine.objectives import FlowObjective
from .comfy_adapter import ComfyModel, escape_caption

LOADERS = ("Load Diffusion Model (weight_dtype default, fp8_e4m3fn or fp8_e4m3fn_fast) or Load Checkpoint "
           "for the model, DualCLIPLoader (clip_l + t5xxl, type flux) and Load VAE (ae.safetensors)")
PREVIEW_GUIDANCE = 3.5  # FluxGuidance's default (the run passes its sample_guidance); Flux dev samples with CFG 1


def is_flux(model_patcher) -> bool:
    """True for ComfyUI's Flux.1 (dev, schnell and the models derived from them); Flux 2, Chroma and
    Kontext-style variants have other classes or inputs and are refused elsewhere."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    return type(base).__name__ == "Flux" and type(dm).__module__.endswith("ldm.flux.model")


def quantized_weights(module: nn.Module) -> str | None:
    """What a GGUF or NF4 loader left in place of plain tensors (None: plain, bf16/fp16/fp32/fp8)."""
    for p in module.parameters():
        kind = type(p).__name__
        if "GGML" in kind or "GGUF" in kind:
            return "GGUF (ComfyUI-GGUF's Unet Loader)"
        if "4bit" in kind or p.dtype == torch.uint8:
            return "NF4 / 4-bit (bitsandbytes)"
    return None


class ComfyFluxModel(ComfyModel):
    """ComfyUI's Flux MODEL (ModelPatcher), its Flux CLIP and VAE as a `TrainableModel`."""

    max_token_windows = 1

    def __init__(self, model, clip, vae, *, name: str = ""):
        if model is None or clip is None or vae is None:
            raise ModelError(f"LoRA Trainer needs MODEL, CLIP and VAE connected for Flux: {LOADERS}.")
        self.mp, self.clip, self.vae = model, clip, vae
        base = model.model
        dm = base.diffusion_model
        quant = quantized_weights(dm)
        if quant is not None:
            raise ModelError(f"This Flux MODEL was loaded as {quant}, whose weights cannot be trained through. "
                             f"Load the Flux file with {LOADERS}.")
        unet_config = base.model_config.unet_config
        if unet_config.get("in_channels", 16) != 16:
            raise ModelError(f"This Flux MODEL takes {unet_config.get('in_channels')} input channels (Fill / "
                             f"inpainting or Kontext-style); only text-to-image Flux.1 dev and schnell train here.")
        if not hasattr(clip.cond_stage_model, "t5xxl"):
            raise ModelError(f"The CLIP is not Flux's text encoder (clip_l + t5xxl); connect {LOADERS}.")
        self._dm = dm
        self._unet = [(n, m) for n, m in dm.named_modules() if isinstance(m, nn.Linear)]
        self._encoders = text_encoders(clip.cond_stage_model, "flux1")
        self.guidance_embed = bool(unet_config.get("guidance_embed", True))
        self.info = ModelInfo(family="flux1", prediction_type="flow", name=name, layout=None,
                              variant="dev" if self.guidance_embed else "schnell")
        self.device = torch.device(model.load_device)
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.sampler_name, self.scheduler = "euler", "simple"
        self.t5_tokens = t5_tokens(0, self.info.variant)
        self._checkpoint = False

    # --- layers -----------------------------------------------------------------------------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._unet)

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        return text_encoder_layers(self._encoders)

    def trainable_roots(self) -> list[nn.Module]:
        return [self._dm, *self.text_models()]

    def set_text_options(self, cfg) -> None:
        self.t5_tokens = t5_tokens(cfg.t5xxl_max_token_length, self.info.variant)

    def objective(self) -> FlowObjective:
        """Rectified flow; sigma drawn with Flux's own resolution-dependent shift unless the config says
        otherwise; dev models get the guidance input (the run's guidance_scale)."""
        return FlowObjective(sampling=self.info.spec.timestep_sampling, guidance=1.0 if self.guidance_embed else None)

    def computes_in(self, dtype: torch.dtype, *, text_encoder: bool) -> bool:
        """The manual-cast Linears cast fp8/bf16 weights to the input's dtype themselves."""
        return self.dtype == dtype and not text_encoder

    # --- compute ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = super().encode_images(pixels)
        self._resident()
        return latents

    def encode_text(self, captions: list[str]) -> Conditioning:
        """T5 hidden states of exactly `t5_tokens` tokens for every caption (one shape to batch and cache):
        ComfyUI's T5 tokenizer pads to its `t5xxl_min_length` option (256 by default) and never cuts, so
        the tokenizer is asked for the length and a longer caption is cut to it before encoding, keeping
        its end token, as kohya's tokenizer truncates (`_cut_t5`)."""
        contexts, pooled = [], []
        n = self.t5_tokens
        for caption in captions:
            tokens = self.clip.tokenize(escape_caption(caption), tokenizer_options={"t5xxl_min_length": n})
            tokens = _cut_t5(tokens, n)
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            cond = out["cond"][:, :n]
            if cond.shape[1] < n:  # a custom tokenizer without padding: pad as T5 would
                cond = torch.cat([cond, cond.new_zeros(cond.shape[0], n - cond.shape[1], cond.shape[2])], 1)
            contexts.append(cond.to(self.device))
            pooled.append(out["pooled_output"].to(self.device))
        if not torch.is_grad_enabled():
            self._resident()
        return {"context": torch.cat(contexts), "pooled": torch.cat(pooled)}

    def _resident(self) -> None:
        """Bring the Flux model back after ComfyUI loaded its VAE or text encoders (which it may have made
        room for by offloading Flux); the text encoders are what leaves the GPU then."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.mp], force_full_load=True)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.dtype
        return flux_forward(self._dm, noisy.to(self.device, dtype), timesteps.to(self.device).float(),
                            cond["context"].to(self.device, dtype), cond["pooled"].to(self.device, dtype),
                            cond.get("guidance"), checkpoint=self._checkpoint)

    # --- lifetime -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        swap = [self._dm] + (self.text_models() if train_text_encoder else [])
        self._resident()
        modes = [(m, m.training) for m in self._dm.modules()]
        with contextlib.ExitStack() as stack:
            stack.enter_context(borrowed_weights(self.trainable_roots(), swap))
            stack.enter_context(host_fp8_casts(self._dm))  # fp8 Linears: no bf16 copy kept for backward
            if train_text_encoder:
                stack.enter_context(clip_backprop_guard(self.text_models()))
            self._checkpoint = gradient_checkpointing
            # fp8_e4m3fn_fast's Linears run their fp8 matmul (no backward, input clamped in place) only in
            # eval mode; in train mode they take the cast path like fp8_e4m3fn
            self._dm.train()
            try:
                yield self
            finally:
                self._checkpoint = False
                for module, flag in modes:
                    module.training = flag

    # --- previews -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "", guidance: float = PREVIEW_GUIDANCE) -> list:
        """Flux previews as a ComfyUI Flux workflow makes them: euler / simple, `cfg` (1 unless a prompt's
        --l says otherwise) and `guidance` in the conditioning, as FluxGuidance puts it (the run's
        sample_guidance, 3.5 by default)."""
        import comfy.sample
        from PIL import Image

        images = []
        for prompt in prompts:
            latent = torch.zeros([1, 16, height // 8, width // 8])
            noise = comfy.sample.prepare_noise(latent, seed)
            positive, negative_cond = self._guided(prompt, guidance), self._guided(negative, guidance)
            samples = comfy.sample.sample(self.mp, noise, steps, cfg, self.sampler_name, self.scheduler, positive,
                                          negative_cond, latent, disable_pbar=True, seed=seed)
            pixels = self.vae.decode(samples)
            for img in pixels.reshape(-1, *pixels.shape[-3:]):
                images.append(Image.fromarray((img.float().clamp(0, 1) * 255).round().byte().cpu().numpy()))
        self._resident()
        return images

    def _guided(self, text: str, guidance: float) -> list:
        cond = self._conditioning(text)
        if self.guidance_embed:
            cond[0][1]["guidance"] = float(guidance)
        return cond


def _cut_t5(tokens: dict, n: int) -> dict:
    """A caption longer than `n` T5 tokens keeps its first n-1 tokens and its end token (the last token
    of ComfyUI's unpadded list), as a tokenizer with `max_length=n, truncation=True` gives it: cut after
    encoding, the context would end mid-caption with no end token, unlike what T5 was trained on and what
    the command line (which truncates at the tokenizer) trains with."""
    t5 = tokens.get("t5xxl") if isinstance(tokens, dict) else None
    if not isinstance(t5, list):
        return tokens
    return {**tokens, "t5xxl": [b[: n - 1] + b[-1:] if len(b) > n else b for b in t5]}
