"""Stable Diffusion 2.x: the 512-base (epsilon) and 768-v (v-prediction) releases share one UNet over
OpenCLIP ViT-H/14, read at its penultimate layer. kohya tells the two apart in `ss_base_model_version`
and stores proj_in/proj_out as 1x1 convs (see `unet.conv_shaped_proj`)."""

from .base import FamilySpec, TextEncoderSpec
from .clip import BANG_ID, select_clip_layer
from .unet import conv_shaped_proj, diffusers_key, select_unet_layer, unet_aliases

SPEC = FamilySpec(
    name="sd2", display_name="SD2.x",
    resolution=512, v_resolution=768, max_bucket_reso=1024,
    base_model_version="sd_v2", v_base_model_version="sd_v2_v", kohya_v2=True,
    architectures={"sd_v2": "stable-diffusion-v2-512/lora", "sd_v2_v": "stable-diffusion-v2-768-v/lora"},
    denoiser_key=diffusers_key, denoiser_aliases=unet_aliases, select_denoiser=select_unet_layer,
    conv_shaped=conv_shaped_proj,
    text_encoders=(TextEncoderSpec(kohya_prefix="lora_te", peft_prefix="text_encoder.", model="OpenCLIP ViT-H/14",
                                   pad_id=BANG_ID, select=select_clip_layer, layers=23),),
    context_dim=1024,
    objective="ddpm", lean_geglu=True,
)
