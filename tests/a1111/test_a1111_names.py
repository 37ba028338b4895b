"""The adapter names LoRA modules exactly as the standalone path (and kohya) does, for the module
names A1111 really has: LDM (SD1.5, SD2.1) and sgm (SDXL) UNets from fixtures/ (dumped from the
ldm/sgm classes A1111 builds), HF CLIP and OpenCLIP text encoders."""

from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.lora.targets import build_network
from engine.families.unet import SD_LAYOUT, SDXL_LAYOUT
from engine.models import full_size_model
from fake_models import meta_tree_from_fixture, openclip_tower
from inplace_lora_a1111.adapter import A1111Model
from engine.hostkit.ldm_names import layout_from_ldm_names

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}


def hf_wrapper(te):
    return SimpleNamespace(input_key="txt", wrapped=SimpleNamespace(transformer=te))


def openclip_wrapper(tower, **attrs):
    return SimpleNamespace(input_key="txt", wrapped=SimpleNamespace(model=tower, **attrs))


def meta_sd_model(fixture: str):
    """A shape-only stand-in for shared.sd_model with A1111's attribute layout for each family."""
    family = FAMILY[fixture]
    standalone = full_size_model(family)
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=meta_tree_from_fixture(fixture)),
                            parameterization="eps", is_sdxl=family == "sdxl", is_sd2=family == "sd2")
    if family == "sd1":
        model.cond_stage_model = hf_wrapper(standalone.text_encoders[0])
    elif family == "sd2":  # ldm FrozenOpenCLIPEmbedder(ViT-H, layer="penultimate"): 24 blocks, 23 used
        model.cond_stage_model = openclip_wrapper(openclip_tower(1024, 24, 16, device="meta"), layer_idx=1)
    else:  # CLIP-L (HF) and OpenCLIP bigG with its pooled output: all 32 blocks used
        bigg = openclip_wrapper(openclip_tower(1280, 32, 20, device="meta"), layer_idx=1, return_pooled=True)
        model.conditioner = SimpleNamespace(embedders=[hf_wrapper(standalone.text_encoders[0]), bigg,
                                                       SimpleNamespace(input_key="original_size_as_tuple")])
    return model, standalone


def names(fixture):
    return [n for n, _ in meta_tree_from_fixture(fixture).named_modules()]


@pytest.mark.parametrize("fixture, layout", [("sd15", SD_LAYOUT), ("sd21", SD_LAYOUT), ("sdxl", SDXL_LAYOUT)])
def test_layout_read_from_the_real_module_names(fixture, layout):
    assert layout_from_ldm_names(names(fixture), fallback=None) == layout


def test_layout_of_a_smaller_unet_is_read_not_assumed():
    # a distilled SD1 with one resnet per level and no attention in the last up level
    ldm = ["input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.1.proj_in", "input_blocks.2.0.op",
           "input_blocks.3.0.in_layers.2", "middle_block.0.in_layers.2", "output_blocks.0.0.in_layers.2",
           "output_blocks.1.0.in_layers.2", "output_blocks.1.1.conv", "output_blocks.2.0.in_layers.2",
           "output_blocks.3.0.in_layers.2"]
    layout = layout_from_ldm_names(ldm, fallback=SD_LAYOUT)
    assert (layout.layers_per_block, layout.down_attn, layout.up_attn, layout.mid_attn) == (1, (True, False),
                                                                                           (False, False), False)
    assert layout_from_ldm_names(["time_embed.0", "out.2"], fallback=SD_LAYOUT) is SD_LAYOUT


@pytest.mark.parametrize("fixture", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("preset", ["kohya", "attention", "locon"])
def test_kohya_keys_equal_the_standalone_paths(webui, fixture, preset):
    sd_model, standalone = meta_sd_model(fixture)
    adapter = A1111Model(sd_model)
    assert adapter.info.family == FAMILY[fixture]
    cfg = TrainConfig(target_modules=preset, train_text_encoder=True, lora_rank=4)
    ours, theirs = build_network(adapter, cfg), build_network(standalone, cfg)
    assert sorted(ours.loras) == sorted(theirs.loras)
    for key, module in theirs.loras.items():  # same layer shapes behind every key
        assert ours.loras[key].lora_down.weight.shape == module.lora_down.weight.shape, key
        assert ours.loras[key].lora_up.weight.shape == module.lora_up.weight.shape, key


def test_expected_counts_and_key_styles(webui):
    """kohya's numbers: SD1.5 192 UNet + 72 TE modules; SDXL 722 + 264, LDM-style UNet keys."""
    for fixture, unet_count, te_count, example in [
            ("sd15", 192, 72, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
            ("sd21", 192, 138, "lora_te_text_model_encoder_layers_22_self_attn_out_proj"),
            ("sdxl", 722, 264, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k")]:
        net = build_network(A1111Model(meta_sd_model(fixture)[0]), TrainConfig(train_text_encoder=True))
        assert len(net) - len(net.te_keys) == unet_count and len(net.te_keys) == te_count, fixture
        assert example in net.loras
    sdxl = build_network(A1111Model(meta_sd_model("sdxl")[0]), TrainConfig(train_text_encoder=True))
    assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj" in sdxl.loras
    assert not any(k.startswith("lora_te_") for k in sdxl.loras)


def test_fused_attention_gets_all_four_projection_keys(webui):
    net = build_network(A1111Model(meta_sd_model("sd21")[0]), TrainConfig(train_text_encoder=True,
                                                                          target_modules="attention"))
    layer0 = sorted(k for k in net.loras if "layers_0_" in k)
    assert layer0 == [f"lora_te_text_model_encoder_layers_0_self_attn_{s}_proj" for s in ("k", "out", "q", "v")]
    assert net.loras[layer0[0]].lora_down.weight.shape == torch.Size([16, 1024])
