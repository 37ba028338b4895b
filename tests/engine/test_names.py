"""diffusers <-> LDM UNet names: the mapping kohya files and both hosts rely on."""

import pytest

from engine.families import get_family
from engine.families.clip import kohya_te_key
from engine.families.unet import SD_LAYOUT, SDXL_LAYOUT, diffusers_to_ldm, ldm_to_diffusers

# Pairs taken from the conversion tables kohya, diffusers and ComfyUI agree on.
SD_PAIRS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.5.1.transformer_blocks.0.ff.net.2"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
]
SDXL_PAIRS = [
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "input_blocks.4.1.transformer_blocks.1.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj", "middle_block.1.transformer_blocks.9.ff.net.0.proj"),
    ("up_blocks.0.attentions.0.proj_in", "output_blocks.0.1.proj_in"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("add_embedding.linear_2", "label_emb.0.2"),
]


@pytest.mark.parametrize("layout,pairs", [(SD_LAYOUT, SD_PAIRS), (SDXL_LAYOUT, SDXL_PAIRS)])
def test_both_directions(layout, pairs):
    for diffusers, ldm in pairs:
        assert diffusers_to_ldm(diffusers, layout) == ldm
        assert ldm_to_diffusers(ldm, layout) == diffusers
        assert ldm_to_diffusers("diffusion_model." + ldm, layout) == diffusers


def test_kohya_keys_follow_kohya_naming_per_family():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert get_family("sd1").denoiser_key(name, SD_LAYOUT) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert get_family("sdxl").denoiser_key(name, SDXL_LAYOUT) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_te_key("lora_te1", "text_model.encoder.layers.0.mlp.fc1") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
