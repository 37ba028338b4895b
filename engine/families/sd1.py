"""Stable Diffusion 1.x: a 512 px UNet over CLIP ViT-L/14, trained on noise (epsilon) prediction."""

from .base import FamilySpec, TextEncoderSpec
from .clip import EOS_ID, select_clip_layer
from .unet import diffusers_key, select_unet_layer, unet_aliases

SPEC = FamilySpec(
    name="sd1", display_name="SD1.x",
    resolution=512, max_bucket_reso=1024,
    base_model_version="sd_v1", architectures={"sd_v1": "stable-diffusion-v1/lora"},
    denoiser_key=diffusers_key, denoiser_aliases=unet_aliases, select_denoiser=select_unet_layer,
    text_encoders=(TextEncoderSpec(kohya_prefix="lora_te", peft_prefix="text_encoder.", model="CLIP ViT-L/14",
                                   pad_id=EOS_ID, select=select_clip_layer),),
    context_dim=768,
    objective="ddpm", lean_geglu=True,
)
