"""What a model family is, as data: `FamilySpec` and `TextEncoderSpec`.

A family file (sd1.py, sd2.py, sdxl.py) fills one `FamilySpec`; everything that differs between
families reads it: the resolution the data pipeline and the hosts use, the metadata kohya writes,
which layers get a LoRA and under which key, the text encoders and their token windows, the extra
conditioning the step feeds the denoiser, the objective and the memory tweaks. A new family is one
more file here plus its adapters' mappings (which host modules are its denoiser and encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from .blocks import BlockLayout

# (layer name as the adapter gives it, the adapter's layout object) -> kohya key / aliases
KeyRule = Callable[[str, Any], str]
AliasRule = Callable[[str, Any], tuple]
# (layer name, module, preset: "kohya" | "attention" | "locon" | list of suffixes) -> gets a LoRA?
SelectRule = Callable[[str, nn.Module, Any], bool]


@dataclass(frozen=True, kw_only=True)
class TextEncoderSpec:
    """One text encoder: how kohya and diffusers name its LoRA and how captions are windowed for it."""

    kohya_prefix: str  # "lora_te" (one encoder), "lora_te1" / "lora_te2" (SDXL)
    peft_prefix: str  # the prefix diffusers/PEFT files use: "text_encoder." / "text_encoder_2."
    model: str  # what it is, for messages: "CLIP ViT-L/14"
    pad_id: int  # the id captions are padded with (CLIP-L: <|endoftext|> 49407; OpenCLIP: "!" 0)
    select: SelectRule  # which of its layers get a LoRA
    window: int = 75  # caption tokens per window (the 77 positions less BOS and EOS)
    max_windows: int = 3  # kohya's max_token_length 225
    trainable: bool = True  # False: never carries LoRA (a T5 kept frozen)
    layers: int | None = None  # layers the family reads and kohya names (SD2: 23 of OpenCLIP-H's 24); None: all


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    name: str  # the key everything uses: "sd1", "sd2", "sdxl"
    display_name: str  # for messages: "SD1.x"

    # --- resolution ---------------------------------------------------------------------------------
    resolution: int  # native training resolution (square side)
    max_bucket_reso: int  # largest bucket side when the config leaves max_bucket_reso at its default (1024)
    v_resolution: int | None = None  # native side of the family's v-prediction release (SD2 768-v)
    oversize_factor: float | None = 1.5  # hosts refuse a resolution whose area is above this x native (None: any)

    # --- kohya / modelspec metadata ------------------------------------------------------------------
    base_model_version: str  # ss_base_model_version
    v_base_model_version: str | None = None  # the same for v-prediction models, where kohya tells them apart
    architectures: Mapping[str, str]  # base model version (or ModelInfo.variant) -> modelspec.architecture
    implementation: str = "diffusers"  # modelspec.implementation
    kohya_v2: bool = False  # ss_v2

    # --- the denoiser's LoRA layers -------------------------------------------------------------------
    denoiser_key: KeyRule
    denoiser_aliases: AliasRule  # the names other tools give a layer (files to continue from)
    select_denoiser: SelectRule
    conv_shaped: Callable[[str, nn.Module], bool] | None = None  # Linear layers kohya saves as 1x1 convs
    blocks: BlockLayout | None = None  # block-wise lr and ranks (blocks.py); None: the family has none
    presets: tuple[str, ...] = ("kohya", "attention", "locon")  # the target_modules names its rules know

    # --- text and conditioning -------------------------------------------------------------------------
    text_encoders: tuple[TextEncoderSpec, ...]
    conditioning: tuple[str, ...] = ("context",)  # what the adapter's encode_text returns
    batch_conditioning: tuple[str, ...] = ()  # what the step adds from the batch (SDXL: "time_ids")
    context_dim: int  # cross-attention width of the full-size model (detection)

    # --- training ---------------------------------------------------------------------------------------
    objective: str = "ddpm"  # the objective kind its models train with (engine/objectives)
    timestep_sampling: str = "uniform"  # flow families: how sigma is drawn when the config says auto
    lean_geglu: bool = False  # its denoiser has GEGLU feed-forwards the lean version can run
    vae_fp32: bool = False  # its VAE overflows in fp16 (NaN latents): encode and decode in fp32
    offload_checkpointing: bool = False  # its forward honours cpu_offload_checkpointing (models/flux_offload.py)
    # torch_compile compiles its forward's blocks, not the whole loss (models/flux_compile.py)
    compile_blocks: bool = False

    def native_resolution(self, prediction_type: str = "epsilon") -> int:
        if prediction_type == "v_prediction" and self.v_resolution:
            return self.v_resolution
        return self.resolution

    def version(self, prediction_type: str = "epsilon") -> str:
        """kohya's `ss_base_model_version`, which A1111 uses to file the LoRA under the right model."""
        if prediction_type == "v_prediction" and self.v_base_model_version:
            return self.v_base_model_version
        return self.base_model_version

    def architecture(self, prediction_type: str = "epsilon", variant: str = "") -> str:
        """modelspec.architecture: by the model's variant where the family names one (Flux.1 dev and
        schnell share a version), else by the base model version."""
        if variant and variant in self.architectures:
            return self.architectures[variant]
        return self.architectures[self.version(prediction_type)]

    def oversized(self, width: int, height: int, native: int) -> bool:
        """True when a training size is far beyond what the family was trained at (a workflow's SDXL
        settings kept after loading an SD1.5 checkpoint)."""
        return self.oversize_factor is not None and width * height > (self.oversize_factor * native) ** 2

    def text_encoder(self, prefix: str) -> TextEncoderSpec:
        for te in self.text_encoders:
            if te.kohya_prefix == prefix:
                return te
        raise KeyError(f"{self.display_name} has no text encoder {prefix!r}")

    @property
    def pad_ids(self) -> list[int]:
        return [te.pad_id for te in self.text_encoders]

    @property
    def token_window(self) -> int:
        """Caption tokens per window (the unit of kohya's max_token_length)."""
        return self.text_encoders[0].window
