"""Block-wise learning rates and ranks (kohya's down_lr_weight / mid_lr_weight / up_lr_weight with their
presets, block_dims / block_alphas): kohya's block numbering, the multipliers in the optimizer's param
groups of a real run, the per-block ranks in the saved file, and clear errors."""

import dataclasses
import math

import pytest
from safetensors import safe_open

import engine.train as train_module
from engine.config import ConfigError, TrainConfig
from engine.families import get_family
from engine.families.blocks import sd_block_index, sdxl_block_index
from engine.lora.blocks import layout_for, lr_weights
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


def test_block_numbers_are_kohyas():
    assert sd_block_index("lora_unet_down_blocks_0_attentions_0_proj_in") == 1
    assert sd_block_index("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q") == 5
    assert sd_block_index("lora_unet_down_blocks_0_downsamplers_0_conv") == 3
    assert sd_block_index("lora_unet_mid_block_attentions_0_proj_out") == 12
    assert sd_block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 24
    assert sd_block_index("lora_unet_up_blocks_1_upsamplers_0_conv") == 18
    assert sd_block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") == -1
    assert sdxl_block_index("lora_unet_input_blocks_4_1_proj_in") == 5
    assert sdxl_block_index("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q") == 11
    assert sdxl_block_index("lora_unet_output_blocks_8_0_in_layers_2") == 21
    assert (get_family("sd1").blocks.total, get_family("sd2").blocks.total, get_family("sdxl").blocks.total) == (25, 25, 23)


def test_presets_and_lists_as_kohya_reads_them():
    layout = get_family("sd1").blocks
    w = lr_weights(TrainConfig(down_lr_weight="sine", up_lr_weight="cosine+.5", mid_lr_weight="0.3"), layout)
    assert len(w) == 25
    assert w[:12] == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in range(12)])
    assert w[12] == 0.3
    assert w[13:] == pytest.approx([math.sin(math.pi * i / 11 / 2) + 0.5 for i in reversed(range(12))])
    w = lr_weights(TrainConfig(down_lr_weight="0,0.5", block_lr_zero_threshold=0.1), layout)
    assert w[:3] == [0.0, 0.5, 1.0] and w[12:] == [1.0] * 13  # missing values are 1
    sdxl = lr_weights(TrainConfig(mid_lr_weight=[0.1, 0.2, 0.3]), get_family("sdxl").blocks)
    assert len(sdxl) == 23 and sdxl[10:13] == [0.1, 0.2, 0.3] and sdxl[0] == sdxl[22] == 1.0
    assert lr_weights(TrainConfig(), layout) is None
    with pytest.raises(ConfigError, match="preset"):
        lr_weights(TrainConfig(down_lr_weight="wavy"), layout)


def test_a_family_without_blocks_says_so():
    spec = dataclasses.replace(get_family("sd1"), blocks=None)
    with pytest.raises(ConfigError, match="block layout"):
        layout_for(TrainConfig(down_lr_weight="sine"), spec)
    assert layout_for(TrainConfig(), spec) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("blocks"), n=2)


def test_multipliers_reach_the_optimizers_param_groups(data, tmp_path, monkeypatch):
    seen = {}
    real = train_module.build_optimizer

    def recording(cfg, groups, device):
        optimizer = real(cfg, groups, device)
        seen["groups"] = [(g.get("name"), g["lr"], len(g["params"])) for g in optimizer.param_groups]
        seen["optimizer"] = optimizer
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    weights = [round(0.05 * i, 2) for i in range(1, 13)]
    cfg = quick_config(data, tmp_path, max_train_steps=1, learning_rate=1e-3, lr_scheduler="constant",
                       down_lr_weight=",".join(map(str, weights)), mid_lr_weight="2", up_lr_weight="zeros+0.25",
                       train_text_encoder=True)
    result = train(cfg, tiny_sd1())
    # kohya's list is indexed by block number: down_lr_weight[0] is block 0 (conv_in, which has no LoRA)
    groups = {name: (lr, n) for name, lr, n in seen["groups"]}
    unet_keys = [k.split(".")[0] for k in result.tensors if k.startswith("lora_unet") and k.endswith("lora_down.weight")]
    blocks = {sd_block_index(k) for k in unet_keys}
    assert set(groups) == {f"unet_block{i}" for i in blocks} | {"text_encoder"}
    for i in blocks:
        expected = 1e-3 * (weights[i] if i < 12 else 2.0 if i == 12 else 0.25)
        assert groups[f"unet_block{i}"][0] == pytest.approx(expected), i
    assert groups["text_encoder"][0] == cfg.text_encoder_lr
    params = sum(n for name, (lr, n) in groups.items() if name != "text_encoder")
    assert params == 2 * len(unet_keys)  # every UNet LoRA weight is in exactly one block group


def test_per_block_ranks_in_the_saved_file_and_blocks_at_zero_left_out(data, tmp_path):
    dims = [4] * 25
    dims[1], dims[12], dims[13] = 8, 2, 0
    alphas = [2.0] * 25
    alphas[12] = 1.0
    cfg = quick_config(data, tmp_path, max_train_steps=1, lora_rank=4, block_dims=",".join(map(str, dims)),
                       block_alphas=",".join(map(str, alphas)), up_lr_weight="1,1,1,1,0")  # block 17 at lr 0
    result = train(cfg, tiny_sd1())
    keys = {k.split(".")[0] for k in result.tensors if k.startswith("lora_unet")}
    by_block = {}
    for key in keys:
        by_block.setdefault(sd_block_index(key), []).append(key)
    assert 13 not in by_block and 17 not in by_block  # rank 0, and lr multiplier 0: no LoRA there
    assert set(by_block) == {1, 12, 16}  # the tiny UNet's attention blocks (1, 12, 13, 16, 17) less those two
    for block, members in by_block.items():
        for key in members:
            rank = result.tensors[f"{key}.lora_down.weight"].shape[0]
            alpha = float(result.tensors[f"{key}.alpha"])
            assert (rank, alpha) == ({1: 8, 12: 2}.get(block, 4), 1.0 if block == 12 else 2.0), key
    with safe_open(str(result.lora_path), "pt") as f:
        args = __import__("json").loads(f.metadata()["ss_network_args"])
    assert args["block_dims"] == cfg.block_dims and args["up_lr_weight"] == "1,1,1,1,0"


def test_wrong_counts_and_kohya_network_args():
    with pytest.raises(ConfigError, match="all 25 blocks"):
        from engine.lora.blocks import ranks

        ranks(TrainConfig(block_dims="4,4,4"), get_family("sd1").blocks)
    cfg = TrainConfig.from_dict({"network_module": "networks.lora",
                                 "network_args": ["down_lr_weight=sine", "mid_lr_weight=0.5", "block_lr_zero_threshold=0.1",
                                                  "block_dims=" + ",".join(["4"] * 25)]})
    assert (cfg.down_lr_weight, cfg.mid_lr_weight, cfg.block_lr_zero_threshold) == ("sine", 0.5, 0.1)
    assert cfg.block_dims == ",".join(["4"] * 25)
