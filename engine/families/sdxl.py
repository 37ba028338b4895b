"""Stable Diffusion XL (base 1.0): a 1024 px UNet over two text encoders (CLIP ViT-L/14 and OpenCLIP
ViT-bigG/14, joined), conditioned also on bigG's pooled embedding and six size ids (original size,
crop, target size) that the step takes from the batch. kohya names its UNet keys from LDM names."""

from .base import FamilySpec, TextEncoderSpec
from .clip import BANG_ID, EOS_ID, select_clip_layer
from .unet import ldm_key, select_unet_layer, unet_aliases

SPEC = FamilySpec(
    name="sdxl", display_name="SDXL",
    resolution=1024, max_bucket_reso=2048, oversize_factor=None,  # room for 2:1 and wider buckets at 1024^2
    base_model_version="sdxl_base_v1-0", architectures={"sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora"},
    implementation="https://github.com/Stability-AI/generative-models",
    denoiser_key=ldm_key, denoiser_aliases=unet_aliases, select_denoiser=select_unet_layer,
    text_encoders=(
        TextEncoderSpec(kohya_prefix="lora_te1", peft_prefix="text_encoder.", model="CLIP ViT-L/14",
                        pad_id=EOS_ID, select=select_clip_layer),
        TextEncoderSpec(kohya_prefix="lora_te2", peft_prefix="text_encoder_2.", model="OpenCLIP ViT-bigG/14",
                        pad_id=BANG_ID, select=select_clip_layer),
    ),
    conditioning=("context", "pooled"), batch_conditioning=("time_ids",),
    context_dim=2048,
    objective="ddpm", lean_geglu=True, vae_fp32=True,
)
