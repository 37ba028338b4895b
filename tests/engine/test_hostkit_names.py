"""LDM module names (ComfyUI's, Forge's) and ComfyUI's unet_config map onto the engine's names (the full-size key check
against real ComfyUI classes is tests/hosts/comfyui/test_kohya_keys.py)."""
import pytest
from torch import nn

from engine.errors import ModelError
from engine.families.unet import SD_LAYOUT, SDXL_LAYOUT
from engine.hostkit.clip_holders import text_encoder_layers, text_encoders
from engine.hostkit.ldm_names import layout_from_unet_config, unet_layers

SD15 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}


def test_layouts_of_comfyui_configs_are_the_engines():
    assert layout_from_unet_config(SD15) == SD_LAYOUT
    assert layout_from_unet_config(SDXL) == SDXL_LAYOUT
    assert not layout_from_unet_config({**SD15, "transformer_depth_middle": -1}).mid_attn


def test_uneven_res_blocks_and_non_unets_are_refused():
    with pytest.raises(ModelError, match="uneven"):
        layout_from_unet_config({**SD15, "num_res_blocks": [2, 1, 2, 2]})
    with pytest.raises(ModelError, match="no UNet"):
        layout_from_unet_config({"depth": 19})


def block(**children):
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


def test_unet_layers_are_named_diffusers_style_and_unknown_layers_refused():
    attn = block(to_q=nn.Linear(4, 4))
    unet = block(input_blocks=nn.ModuleList([block(**{"0": nn.Conv2d(4, 4, 3)}),
                                             block(**{"1": block(transformer_blocks=nn.ModuleList(
                                                 [block(attn1=attn)]))})]))
    names = [n for n, _ in unet_layers(unet, SD_LAYOUT)]
    assert names == ["conv_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    unet.add_module("extra_head", nn.Linear(4, 4))
    unet.input_blocks.add_module("2", block(**{"5": nn.Linear(4, 4)}))
    with pytest.raises(ModelError, match="no diffusers/kohya name"):
        unet_layers(unet, SD_LAYOUT)


def clip_holder(layers):
    encoder = block(layers=nn.ModuleList([block(mlp=block(fc1=nn.Linear(2, 2))) for _ in range(layers)]))
    return block(transformer=block(text_model=block(encoder=encoder), text_projection=nn.Linear(2, 2)))


def test_text_encoder_prefixes_and_sd2_last_layer():
    sd1 = block(clip_l=clip_holder(12))
    [(prefix, te, skip)] = text_encoders(sd1, "sd1")
    assert prefix == "lora_te" and skip is None
    names = [n for _, n, _ in text_encoder_layers(text_encoders(sd1, "sd1"))]
    assert "text_model.encoder.layers.11.mlp.fc1" in names and "text_projection" in names
    sd2 = block(clip_h=clip_holder(24))
    names = [n for _, n, _ in text_encoder_layers(text_encoders(sd2, "sd2"))]
    assert "text_model.encoder.layers.22.mlp.fc1" in names
    assert not any(".layers.23." in n for n in names), "diffusers' SD2 encoder has 23 layers"
    sdxl = block(clip_l=clip_holder(12), clip_g=clip_holder(32))
    assert [p for p, _, _ in text_encoders(sdxl, "sdxl")] == ["lora_te1", "lora_te2"]
    with pytest.raises(ModelError, match="clip_l/clip_g"):
        text_encoders(sd1, "sdxl")
