"""`FluxModel`: Flux.1 loaded by the engine itself (the command line), through the seam.

The transformer is the engine's BFL module tree (flux_model.py) run by flux_forward.py; the autoencoder
is diffusers' AutoencoderKL (latents scaled and shifted as Flux's latent format: (z - 0.1159) * 0.3611);
captions go through CLIP-L (pooled output, 77 tokens) and T5 (hidden states, `t5xxl_max_token_length`
tokens: kohya's 512 for dev, 256 for schnell by default; no attention mask, as kohya by default).
`fp8_base` stores the transformer's Linear weights in float8 and each layer casts its weight to
bf16/fp16 as it runs (engine/models/fp8.py), as kohya's --fp8_base does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..families.flux1 import t5_tokens
from ..model import Conditioning, ModelInfo, TrainableModel
from ..objectives import FlowObjective
from .flux_forward import flux_forward
from .flux_tiny import FLUX_SCALE, FLUX_SHIFT


class FluxModel(TrainableModel):
    def __init__(self, transformer, vae, clip_l, t5, clip_tok, t5_tok, *, name: str = "", device="cpu",
                 dtype=torch.float32, source_path: Path | None = None):
        self.transformer, self.vae, self.clip_l, self.t5 = transformer, vae, clip_l, t5
        self.clip_tok, self.t5_tok = clip_tok, t5_tok
        self.guidance_embed = hasattr(transformer, "guidance_in")
        self.info = ModelInfo(family="flux1", prediction_type="flow", name=name, layout=None,
                              variant="dev" if self.guidance_embed else "schnell")
        self.device, self.dtype = torch.device(device), dtype
        self.source_path = source_path
        self.t5_tokens = t5_tokens(0, self.info.variant)
        self._checkpoint = False

    # --- layers -----------------------------------------------------------------------------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, m) for n, m in self.transformer.named_modules() if isinstance(m, nn.Linear))

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        wrap = "" if hasattr(self.clip_l, "text_model") else "text_model."  # transformers >= 5.6 flattened it
        return (("lora_te1", wrap + n, m) for n, m in self.clip_l.named_modules() if isinstance(m, nn.Linear))

    def trainable_roots(self) -> list[nn.Module]:
        return [self.transformer, self.clip_l]

    def set_text_options(self, cfg) -> None:
        self.t5_tokens = t5_tokens(cfg.t5xxl_max_token_length, self.info.variant)

    def objective(self) -> FlowObjective:
        return FlowObjective(sampling=self.info.spec.timestep_sampling, guidance=1.0 if self.guidance_embed else None)

    def vae_module(self) -> nn.Module | None:
        return self.vae

    def idle_encoders(self, *, vae: bool, text: bool) -> list[nn.Module]:
        picked = ([self.vae] if vae else []) + ([self.clip_l, self.t5] if text else [])
        return [m for m in picked if m is not None]

    # --- compute ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mode()
        return ((z.float() - FLUX_SHIFT) * FLUX_SCALE)

    def encode_text(self, captions: list[str]) -> Conditioning:
        from .clip_tokenizer import tokenize

        ids = tokenize(self.clip_tok, captions).to(self.device)
        pooled = self.clip_l(ids).pooler_output
        t5_ids = self.t5_tok(list(captions), padding="max_length", max_length=self.t5_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():  # T5 is never trained
            context = self.t5(t5_ids).last_hidden_state
        return {"context": context.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return flux_forward(self.transformer, noisy, timesteps.float(), cond["context"], cond["pooled"],
                            cond.get("guidance"), checkpoint=self._checkpoint)

    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "", guidance: float = 3.5) -> list:
        """Previews with the LoRA as trained so far (engine/models/flux_preview.py)."""
        from .flux_preview import sample_flux

        return sample_flux(self, prompts, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                           negative=negative, guidance=guidance)

    # --- lifetime -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        with super().session(gradient_checkpointing, train_text_encoder):
            self.t5.requires_grad_(False)
            self._checkpoint = gradient_checkpointing
            try:
                yield self
            finally:
                self._checkpoint = False


def load_flux(cfg, path: Path, *, device, dtype: torch.dtype) -> FluxModel:
    """Flux.1 from `path` (a BFL transformer file with the config's ae / clip_l / t5xxl files, an all-in-one
    checkpoint or a diffusers folder: engine/models/flux_sources.py)."""
    from .clip_tokenizer import clip_tokenizer
    from .flux_sources import load_transformer, part_loaders, t5_tokenizer

    loaders = part_loaders(cfg, path)
    transformer = load_transformer(path, dtype)
    vae, clip_l, t5 = loaders["ae"](), loaders["clip_l"](), loaders["t5xxl"]()
    for module in (transformer, vae, clip_l, t5):
        module.requires_grad_(False).eval()
    torch.nn.Module.to(transformer, device)
    torch.nn.Module.to(vae, device, torch.float32)
    torch.nn.Module.to(clip_l, device, dtype)
    torch.nn.Module.to(t5, device, dtype)
    return FluxModel(transformer, vae, clip_l, t5, clip_tokenizer(), t5_tokenizer(cfg, path),
                     name=path.name, device=device, dtype=dtype, source_path=path)
