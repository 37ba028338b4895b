"""The seam: the small interface every host adapter fulfils so one loop can train on any host's model.

A host (the standalone diffusers loader, ComfyUI, A1111) wraps whatever it has loaded in a
`TrainableModel`. The loop only ever asks it for:

- which family the model is (`info.family`, a name in `engine.families`: everything that differs
  between families is data there),
- the denoiser's and text encoders' trainable layers under the names the family's key rules read
  (diffusers-style UNet names and HF-style CLIP names for the SD families),
- `encode_images(pixels) -> latents` and `encode_text(captions) -> conditioning` (both cacheable),
- the objective its loaded model trains with (`objective()`: the schedule and prediction type as the
  host has them) and `predict(noisy, timestep, cond)`.

The training step (engine/step.py) turns these into a loss with the objective. Adapters attach nothing
themselves: LoRA goes on as forward hooks (`engine.lora.network`), and `session()` restores every flag
it touched, so the host's model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError
from .families import FamilySpec, get_family
from .families.unet import SD_LAYOUT
from .objectives import Objective

# A conditioning batch: tensors keyed by role, first dimension = batch. The family spec lists them
# (FamilySpec.conditioning from encode_text, .batch_conditioning added by the step from the batch):
#   "context": [B, tokens, dim]   cross-attention states (all families)
#   "pooled":  [B, 1280]          SDXL pooled text embedding
#   "time_ids":[B, 6]             SDXL size conditioning (from the batch's image sizes and crops)
Conditioning = dict[str, torch.Tensor]


@dataclass
class ModelInfo:
    """What the run and the saved file need to know about the base model."""

    family: str  # a name in engine.families: "sd1" | "sd2" | "sdxl"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" (DDPM families)
    resolution: int = 0  # native training resolution; 0: the family's for the prediction type
    name: str = ""  # shown as ss_sd_model_name
    sha256: str | None = None  # ss_new_sd_model_hash, when the adapter knows it cheaply
    layout: Any = field(default_factory=lambda: SD_LAYOUT)  # what the family's key rules read (UNetLayout)
    clip_skip: int | None = None
    variant: str = ""  # a release within the family where the metadata tells them apart (Flux.1 dev / schnell)

    def __post_init__(self):
        if not self.resolution:
            self.resolution = self.spec.native_resolution(self.prediction_type)

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def base_model_version(self) -> str:
        """kohya's `ss_base_model_version`, which A1111 uses to file the LoRA under the right model."""
        return self.spec.version(self.prediction_type)


class TrainableModel(ABC):
    """What the loop needs from a host. Subclasses: `engine.models.diffusers_adapter.DiffusersModel`
    (standalone and tests), `nodes.comfy_adapter` and `scripts`' A1111 adapter."""

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype  # the dtype the frozen weights compute in

    # --- layers that may carry LoRA -------------------------------------------------------------
    @abstractmethod
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every Linear/Conv2d of the denoiser as (name, module), named as the family's rules read them.

        SD families: diffusers' UNet2DConditionModel names (`down_blocks.0.attentions.0.proj_in`,
        `...transformer_blocks.0.attn1.to_q`, `...resnets.0.conv1`, `...downsamplers.0.conv`) whatever
        the host calls them (engine/hostkit maps LDM names), so target selection and kohya naming are
        written once.
        """

    @abstractmethod
    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        """Every Linear of the text encoder(s) as (kohya prefix, HF-style dotted name, module).

        Prefixes are the family's (FamilySpec.text_encoders: "lora_te" for one encoder, "lora_te1"/
        "lora_te2" for SDXL's two). Names follow transformers' CLIPTextModel:
        `text_model.encoder.layers.0.self_attn.q_proj`, `...mlp.fc1`.
        """

    @abstractmethod
    def trainable_roots(self) -> list[nn.Module]:
        """The root modules (denoiser, text encoders) whose state `session()` must leave unchanged."""

    # --- objective ------------------------------------------------------------------------------
    @abstractmethod
    def objective(self) -> Objective:
        """The objective the loaded model trains with, as the host has it (DDPM: its schedule, on the
        CPU, and `info.prediction_type`); the run adds its options."""

    # --- compute ----------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] -> latents as the denoiser sees them (scaled, shifted)."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> Conditioning:
        """Captions -> conditioning. Runs with grad when the text encoders carry trainable LoRA."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output (eps or v, per `info.prediction_type`; velocity for flow), given
        the objective's timestep (DDPM: integer t; flow: sigma in [0, 1])."""

    token_windows: int = 1  # caption windows `encode_text` joins (kohya's max_token_length / 75)
    max_token_windows: int = 1  # what this adapter's `encode_text` can join (3 = max_token_length 225)

    def set_token_windows(self, windows: int) -> None:
        """Encode captions in `windows` token windows (75 tokens for CLIP) from now on. Adapters that can
        join windows raise `max_token_windows`; the others keep one (as kohya trains by default)."""
        size = self.info.spec.token_window
        if not 1 <= windows <= self.max_token_windows:
            raise ConfigError(f"max_token_length {size * windows} is not supported when training inside this "
                              f"host yet; set it to {size} (longer captions are cut after {size} tokens), or "
                              f"train with the command line (python -m engine train) or in ComfyUI, which "
                              f"support {2 * size} and {3 * size}.")
        self.token_windows = windows

    def set_text_options(self, cfg) -> None:
        """Read the run's text settings that only some families have (Flux.1: t5xxl_max_token_length),
        before any caption is encoded. Default: none."""

    def computes_in(self, dtype: torch.dtype, *, text_encoder: bool) -> bool:
        """True when every floating weight the training forward runs through (the denoiser, and the
        text encoders when they are trained) already is `dtype`: then the step needs no autocast."""
        from .models.fp8 import casts_itself  # fp8_base layers cast their weights themselves

        roots = self.trainable_roots()
        return all(t.dtype == dtype for root in (roots if text_encoder else roots[:1]) for m in root.modules()
                   for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
                   if t.is_floating_point() and not (casts_itself(m) and t is m.weight))

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
    def checkpointing(self, train_text_encoder: bool):
        """A context manager that turns gradient checkpointing on from now until it exits (what
        `session(gradient_checkpointing=True)` does), for the out-of-memory recovery to turn it on in
        the middle of a run; None where the adapter cannot (the recovery then skips that plan)."""
        return None

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
