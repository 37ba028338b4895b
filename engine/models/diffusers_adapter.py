"""`DiffusersModel`: the standalone (non-host) model, and the reference implementation of the seam.

It wraps diffusers/transformers components (UNet2DConditionModel, AutoencoderKL, CLIP text
encoders and tokenizers) with the kohya/SD DDPM schedule. Conditioning follows what the
checkpoints were trained with and what kohya does: SD1 reads CLIP-L's last layer (or
hidden_states[-clip_skip] + final norm), SD2 the penultimate OpenCLIP layer (the 23-layer encoder's
output), SDXL concatenates both encoders' penultimate layers and uses bigG's projected EOS token as
the pooled vector. A model passed in by a caller (`owns_weights=False`) is borrowed: `session()`
returns it bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..families.unet import UNetLayout
from ..model import Conditioning, ModelInfo, TrainableModel, preserve_module_state
from ..objectives import DDPMObjective
from .clip_tokenizer import join_windows, window_ids
from .fp8 import holds_fp8
from .module_state import attention_kernel, gradient_checkpointing, placed_on, temporarily_float32

logger = logging.getLogger(__name__)

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def default_time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL size conditioning for an uncropped image trained at its own size:
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)


def _final_norm(te: nn.Module) -> nn.Module:
    return te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


class DiffusersModel(TrainableModel):
    """SD1.x / SD2.x / SDXL as diffusers components, driven through the `TrainableModel` seam."""

    max_token_windows = 3  # max_token_length up to 225, windows joined as kohya joins them

    def __init__(self, *, unet, vae, text_encoders, tokenizers, info: ModelInfo, owns_weights: bool = False,
                 device=None, dtype: torch.dtype | None = None, attention: str = "sdpa", sampler: str = "ddim",
                 zero_terminal_snr: bool = False, notes: list[str] | None = None, source_path: Path | None = None,
                 pad_ids: list[int] | None = None):
        from diffusers import DDPMScheduler

        wanted = len(info.spec.text_encoders)
        if len(text_encoders) != len(tokenizers) or len(text_encoders) != wanted:
            raise ValueError(f"{info.family} needs {wanted} text encoder(s) and as many tokenizers, got "
                             f"{len(text_encoders)} and {len(tokenizers)}")
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.pad_ids = list(pad_ids) if pad_ids is not None else info.spec.pad_ids
        self.info = info
        self.device = torch.device(device) if device is not None else _param(unet).device
        self.dtype = dtype or _param(unet).dtype
        self.owns_weights = owns_weights
        self.attention = attention
        self.sampler = sampler
        self.zero_terminal_snr = zero_terminal_snr
        self.notes = list(notes or [])
        self.source_path = source_path
        self.noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=info.prediction_type, clip_sample=False,
                                             rescale_betas_zero_snr=zero_terminal_snr)

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, *, unet, vae, text_encoders, tokenizers, family: str | None = None,
                        prediction_type: str = "epsilon", name: str = "", clip_skip: int = 0,
                        owns_weights: bool = False, **kwargs) -> "DiffusersModel":
        """Wrap loose components. `family` defaults to what the UNet says (SDXL: added text-time
        embedding; SD2: 1024-wide cross-attention; else SD1)."""
        cfg = unet.config
        if family is None:
            if getattr(cfg, "addition_embed_type", None) == "text_time" or len(text_encoders) == 2:
                family = "sdxl"
            else:
                family = "sd2" if cfg.cross_attention_dim == 1024 else "sd1"
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        info = ModelInfo(family=family, prediction_type=prediction_type, resolution=int(cfg.sample_size) * vae_scale,
                         name=name, layout=UNetLayout.from_diffusers_config(cfg), clip_skip=clip_skip or None)
        return cls(unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers, info=info,
                   owns_weights=owns_weights, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe, owns_weights: bool = False, **kwargs) -> "DiffusersModel":
        """Wrap a diffusers StableDiffusion(XL)Pipeline's components; the pipeline itself is not kept."""
        tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
        kwargs.setdefault("prediction_type", pipe.scheduler.config.get("prediction_type", "epsilon"))
        kwargs.setdefault("name", Path(str(pipe.config.get("_name_or_path", "") or "")).name)
        return cls.from_components(unet=pipe.unet, vae=pipe.vae, text_encoders=tes, tokenizers=toks,
                                   owns_weights=owns_weights, **kwargs)

    # --- layers ----------------------------------------------------------------------------------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                yield name, module

    def te_prefixes(self) -> list[str]:
        return [te.kohya_prefix for te in self.info.spec.text_encoders]

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        for prefix, te in zip(self.te_prefixes(), self.text_encoders):
            # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); kohya keys keep the HF path
            wrap = "" if hasattr(te, "text_model") else "text_model."
            for name, module in te.named_modules():
                if isinstance(module, nn.Linear):
                    yield prefix, (name if name == "text_projection" else wrap + name), module

    def trainable_roots(self) -> list[nn.Module]:
        return [self.unet, *self.text_encoders]

    def vae_module(self) -> nn.Module | None:
        return self.vae

    def idle_encoders(self, *, vae: bool, text: bool) -> list[nn.Module]:
        return ([self.vae] if vae and self.vae is not None else []) + (list(self.text_encoders) if text else [])

    def objective(self) -> DDPMObjective:
        """From the scheduler config: its schedule (zero-terminal-SNR when the checkpoint says so) and
        the prediction type."""
        acp = self.noise_scheduler.alphas_cumprod.detach().float().cpu().clone()
        return DDPMObjective(acp, self.info.prediction_type)

    # --- compute ---------------------------------------------------------------------------------------
    def _vae_needs_fp32(self) -> bool:
        # the stock SDXL VAE overflows in fp16 (NaN latents); fp32 is exact and cheap for one encode
        return self.info.spec.vae_fp32 and _param(self.vae).dtype == torch.float16

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latent mean x scaling factor (no sampling, so cached latents are exact), float32."""
        latents = self._encode(pixels, force_fp32=self._vae_needs_fp32())
        if not torch.isfinite(latents).all() and _param(self.vae).dtype == torch.float16:
            logger.warning("VAE produced NaN/inf in fp16; encoding this batch again in fp32")
            latents = self._encode(pixels, force_fp32=True)
        return latents

    def _encode(self, pixels: torch.Tensor, force_fp32: bool) -> torch.Tensor:
        vae = self.vae
        with temporarily_float32(vae, force_fp32):
            p = _param(vae)
            mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            return ((mean.float() - shift) * vae.config.scaling_factor).to(self.device)

    def encode_text(self, captions: list[str]) -> Conditioning:
        captions = [str(c) for c in captions]
        skip = self.info.clip_skip or 0
        if "pooled" in self.info.spec.conditioning:
            return self._encode_sdxl(captions, skip)
        te, tok, n = self.text_encoders[0], self.tokenizers[0], self.token_windows
        ids = window_ids(tok, captions, self.pad_ids[0], n).to(_param(te).device)
        if skip <= 1:
            context = te(ids).last_hidden_state
        else:  # kohya / A1111 "CLIP skip": the N-th last layer, then the final layer norm
            hidden = te(ids, output_hidden_states=True).hidden_states[-skip]
            context = _final_norm(te)(hidden)
        return {"context": join_windows(context, n).to(self.device)}

    def _encode_sdxl(self, captions: list[str], skip: int) -> Conditioning:
        (te1, te2), (tok1, tok2) = self.text_encoders, self.tokenizers
        layer = -max(2, skip)  # SDXL was trained on the penultimate layers, without the final norm
        n = self.token_windows
        ids1 = window_ids(tok1, captions, self.pad_ids[0], n).to(_param(te1).device)
        ids2 = window_ids(tok2, captions, self.pad_ids[1], n).to(_param(te2).device)
        out1, out2 = te1(ids1, output_hidden_states=True), te2(ids2, output_hidden_states=True)
        h1, h2 = join_windows(out1.hidden_states[layer], n), join_windows(out2.hidden_states[layer], n)
        context = torch.cat([h1.to(self.device), h2.to(self.device, h1.dtype)], dim=-1)
        pooled = out2.text_embeds[::n]  # the first window's, as kohya pools long captions
        return {"context": context, "pooled": pooled.to(self.device)}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        p = _param(self.unet)
        kwargs = {}
        if "time_ids" in self.info.spec.batch_conditioning:
            time_ids = cond.get("time_ids")
            if time_ids is None:
                h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
                time_ids = default_time_ids(h, w, noisy.shape[0])
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(p.device, p.dtype),
                                           "time_ids": time_ids.to(p.device, p.dtype)}
        return self.unet(noisy.to(p.device, p.dtype), timesteps.to(p.device),
                         encoder_hidden_states=cond["context"].to(p.device, p.dtype), return_dict=False,
                         **kwargs)[0]

    # --- lifetime --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        """On the device, frozen, checkpointing as asked; everything undone afterwards. Owned models
        stay on the device; borrowed ones go back where they were, bit-identical."""
        movable = self.trainable_roots() + ([self.vae] if self.vae is not None else [])
        with contextlib.ExitStack() as stack:
            stack.enter_context(super().session(gradient_checkpointing, train_text_encoder))
            stack.enter_context(placed_on(movable, self.device, restore=not self.owns_weights))
            if gradient_checkpointing:
                stack.enter_context(self.checkpointing(train_text_encoder))
            stack.enter_context(attention_kernel(self.unet, self.attention))
            yield self

    def checkpointing(self, train_text_encoder: bool):
        return _gc_and_mode([self.unet] + (self.text_encoders if train_text_encoder else []))

    # --- previews --------------------------------------------------------------------------------------
    def _sampling_scheduler(self):
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        common = dict(**SCHEDULE, prediction_type=self.info.prediction_type, steps_offset=1,
                      rescale_betas_zero_snr=self.zero_terminal_snr,
                      timestep_spacing="trailing" if self.zero_terminal_snr else "leading")
        if self.sampler == "euler":
            return EulerDiscreteScheduler(**common)
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)

    def _pipeline(self):
        """A diffusers pipeline over our UNet/VAE. Prompts go in as embeddings from `encode_text`, so
        the text encoders (and any LoRA hooks on them) are used exactly as in training."""
        StableDiffusionPipeline, StableDiffusionXLPipeline = _pipeline_classes()
        if self.info.family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                             tokenizer_2=None, unet=self.unet, scheduler=self._sampling_scheduler(),
                                             add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
                                           scheduler=self._sampling_scheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "") -> list:
        """One PIL image per prompt, each from the same seeded noise so previews compare across steps."""
        pipe = self._pipeline()
        p = _param(self.unet)
        factor = pipe.vae_scale_factor
        images = []
        fp8 = holds_fp8(self.unet)  # fp8_base: sampled under autocast, as before (its layers also run without)
        with preserve_module_state(self.trainable_roots()):
            for root in self.trainable_roots():
                root.eval()
            uncond = self.encode_text([negative])
            for prompt in prompts:
                cond = self.encode_text([prompt])
                gen = torch.Generator("cpu").manual_seed(int(seed))
                noise = torch.randn((1, self.unet.config.in_channels, height // factor, width // factor),
                                    generator=gen).to(p.device, p.dtype)
                kwargs = dict(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"],
                              num_inference_steps=steps, guidance_scale=cfg, height=height, width=width,
                              latents=noise, output_type="latent")
                if self.info.family == "sdxl":
                    kwargs.update(pooled_prompt_embeds=cond["pooled"], negative_pooled_prompt_embeds=uncond["pooled"],
                                  original_size=(height, width), target_size=(height, width))
                with torch.autocast(p.device.type, dtype=self.dtype, enabled=fp8):
                    latents = pipe(**kwargs).images
                images.extend(self.decode_latents(latents))
        return images

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """Latents (as the denoiser sees them) -> PIL images, the VAE in fp32 where fp16 overflows."""
        from PIL import Image

        vae = self.vae
        with temporarily_float32(vae, self._vae_needs_fp32()):
            p = _param(vae)
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            z = latents.to(p.device, p.dtype) / vae.config.scaling_factor + shift
            pixels = vae.decode(z, return_dict=False)[0]
        arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def _pipeline_classes():
    """diffusers' pipelines import transformers' image processors, and transformers warns when
    torchvision is missing (a CPU install need not have it; previews never use those processors)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        hf_logging.set_verbosity(level)
    return StableDiffusionPipeline, StableDiffusionXLPipeline


@contextlib.contextmanager
def _gc_and_mode(roots: list[nn.Module]):
    """Checkpointing on `roots`, which must be in train mode for transformers to honour it (the base
    session restores the modes)."""
    if not roots:
        yield
        return
    with gradient_checkpointing(roots):
        for root in roots:
            root.train()
        yield
