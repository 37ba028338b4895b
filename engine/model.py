"""The seam: the small interface every host adapter fulfils so one loop can train on any host's model.

A host (the standalone diffusers loader, ComfyUI, A1111) wraps whatever it has loaded in a
`TrainableModel`. The loop only ever asks it for:

- the denoiser's and text encoders' trainable layers, named the way kohya names them
  (diffusers-style UNet names, HF-style CLIP names; `engine.lora.names` turns them into keys),
- `encode_images(pixels) -> latents` and `encode_text(captions) -> conditioning` (both cacheable),
- the noise schedule (`alphas_cumprod`, `prediction_type`) and `predict(noisy, t, cond)`.

The loss is defined once over (x0, noise, t) in `engine.loss`, so every family shares it. Adapters
attach nothing themselves: LoRA goes on as forward hooks (`engine.lora.network`), and `session()`
restores every flag it touched, so the host's model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# A conditioning batch: tensors keyed by role, first dimension = batch.
#   "context": [B, tokens, dim]   cross-attention states (all families)
#   "pooled":  [B, 1280]          SDXL pooled text embedding
#   "time_ids":[B, 6]             SDXL size conditioning (added by the loop from the batch's sizes)
Conditioning = dict[str, torch.Tensor]


@dataclass
class UNetLayout:
    """The block structure that maps diffusers UNet names to LDM (`input_blocks.N.M`) names and back.

    `down_attn[i]` / `up_attn[i]`: whether down/up block i has attentions; `layers_per_block` counts
    resnets per down block (up blocks have one more), as in diffusers' config.
    """

    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    layers_per_block: int = 2
    mid_attn: bool = True

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetLayout":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        lpb = get("layers_per_block", 2)
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            down_attn=tuple("CrossAttn" in t for t in get("down_block_types")),
            up_attn=tuple("CrossAttn" in t for t in get("up_block_types")),
            layers_per_block=lpb,
            mid_attn=mid is not None and "CrossAttn" in str(mid),
        )


SD_LAYOUT = UNetLayout(down_attn=(True, True, True, False), up_attn=(False, True, True, True))
SDXL_LAYOUT = UNetLayout(down_attn=(False, True, True), up_attn=(True, True, False))


@dataclass
class ModelInfo:
    """What the run and the saved file need to know about the base model."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    resolution: int = 512  # the family's native training resolution
    name: str = ""  # shown as ss_sd_model_name
    sha256: str | None = None  # ss_new_sd_model_hash, when the adapter knows it cheaply
    layout: UNetLayout = field(default_factory=lambda: SD_LAYOUT)
    clip_skip: int | None = None

    @property
    def base_model_version(self) -> str:
        """kohya's `ss_base_model_version`, which A1111 uses to file the LoRA under the right model."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        if self.family == "sd2":
            return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"


class TrainableModel(ABC):
    """What the loop needs from a host. Subclasses: `engine.models.diffusers_adapter.DiffusersModel`
    (standalone and tests), `nodes.comfy_adapter` and `scripts`' A1111 adapter."""

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype  # the dtype the frozen weights compute in

    # --- layers that may carry LoRA -------------------------------------------------------------
    @abstractmethod
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every Linear/Conv2d of the denoiser as (diffusers-style dotted name, module).

        Names follow diffusers' UNet2DConditionModel (`down_blocks.0.attentions.0.proj_in`,
        `...transformer_blocks.0.attn1.to_q`, `...resnets.0.conv1`, `...downsamplers.0.conv`) whatever
        the host calls them, so target selection and kohya naming are written once.
        """

    @abstractmethod
    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        """Every Linear of the text encoder(s) as (kohya prefix, HF-style dotted name, module).

        Prefix is "lora_te" for one encoder, "lora_te1"/"lora_te2" for SDXL's two. Names follow
        transformers' CLIPTextModel: `text_model.encoder.layers.0.self_attn.q_proj`, `...mlp.fc1`.
        """

    @abstractmethod
    def trainable_roots(self) -> list[nn.Module]:
        """The root modules (denoiser, text encoders) whose state `session()` must leave unchanged."""

    # --- schedule -------------------------------------------------------------------------------
    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The DDPM cumulative alphas, float32, shape [num_train_timesteps], on CPU."""

    # --- compute ----------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] -> latents as the denoiser sees them (scaled, shifted)."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> Conditioning:
        """Captions -> conditioning. Runs with grad when the text encoders carry trainable LoRA."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output (eps or v, per `info.prediction_type`)."""

    def size_conditioning(self) -> bool:
        """True when `cond` needs "time_ids" (SDXL's original size / crop / target size)."""
        return self.info.family == "sdxl"

    token_windows: int = 1  # 75-token caption windows `encode_text` joins (kohya's max_token_length / 75)
    max_token_windows: int = 1  # what this adapter's `encode_text` can join (3 = max_token_length 225)

    def set_token_windows(self, windows: int) -> None:
        """Encode captions in `windows` 75-token windows from now on. Adapters that can join windows
        raise `max_token_windows`; the others keep one (75 tokens, as kohya trains by default)."""
        if not 1 <= windows <= self.max_token_windows:
            raise ConfigError(f"max_token_length {75 * windows} is not supported when training inside this "
                              f"host yet; set it to 75 (longer captions are cut after 75 tokens), or train with "
                              f"the command line (python -m engine train) or in ComfyUI, which support 150 "
                              f"and 225.")
        self.token_windows = windows

    def computes_in(self, dtype: torch.dtype, *, text_encoder: bool) -> bool:
        """True when every floating weight the training forward runs through (the denoiser, and the
        text encoders when they are trained) already is `dtype`: then the step needs no autocast."""
        roots = self.trainable_roots()
        return all(t.dtype == dtype for root in (roots if text_encoder else roots[:1])
                   for t in [*root.parameters(), *root.buffers()] if t.is_floating_point())

    # --- lifetime ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        """Make the model ready to train (on the device, frozen, checkpointing as asked) and put every
        flag back afterwards, also after an exception. Adapters extend this with host specifics."""
        with preserve_module_state(self.trainable_roots()):
            for root in self.trainable_roots():
                root.requires_grad_(False)
            yield self

    # --- optional ----------------------------------------------------------------------------------
    def vae_module(self) -> nn.Module | None:
        """The VAE as a module, so the disk latent cache can key on its weights (None: the host hides
        it, and the cache keys on the checkpoint's name or hash instead)."""
        return None

    def idle_encoders(self, *, vae: bool, text: bool) -> list[nn.Module]:
        """Frozen encoder modules the loop may park in CPU memory while it trains from caches
        (`vae`: every latent is cached; `text`: every caption's conditioning is cached and the text
        encoders are not trained). Default: none, for hosts that manage their own memory."""
        return []

    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "") -> list:
        """Preview images (PIL) with the LoRA hooks as currently attached. Optional: hosts that sample
        with their own machinery (ComfyUI's KSampler) leave it unimplemented and previews are skipped."""
        raise NotImplementedError


@contextlib.contextmanager
def preserve_module_state(roots: list[nn.Module]):
    """Restore requires_grad and train/eval flags of every parameter and module under `roots`."""
    grads = [(p, p.requires_grad) for r in roots for p in r.parameters()]
    modes = [(m, m.training) for r in roots for m in r.modules()]
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
