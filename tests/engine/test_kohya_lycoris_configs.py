"""kohya / lora-scripts configs that train LyCORIS' LoHa, LoKr or DoRA load with their meaning.

A kohya user writes `network_module = "lycoris.kohya"` with `network_args = ["algo=lokr", "factor=8", ...]`
(LyCORIS' kohya.py reads them, sd-scripts passes them on as strings). Each argument must land on our
field of the same meaning (network_type, lokr_factor, decompose_both, full_matrix, conv_rank/conv_alpha,
target_modules for LyCORIS' preset), LyCORIS' defaults where ours differ (conv_alpha = network_alpha),
and the file we write must name the same module and arguments, so the config and the file agree.
"""

import logging

import pytest

from engine.config import TrainConfig, load_config
from engine.errors import ConfigError
from engine.lora.variants.lycoris_args import network_metadata

LYCORIS_TOML = """\
[model]
pretrained_model_name_or_path = "model.safetensors"

[network]
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 4
network_args = [{args}]
"""


def _toml(tmp_path, *args: str) -> TrainConfig:
    path = tmp_path / "lycoris.toml"
    path.write_text(LYCORIS_TOML.format(args=", ".join(f'"{a}"' for a in args)), encoding="utf-8")
    return load_config(path)


def test_lokr_config_maps_every_argument_and_the_file_says_the_same(tmp_path):
    cfg = _toml(tmp_path, "algo=lokr", "factor=8", "decompose_both=True", "conv_dim=4", "conv_alpha=2")
    assert (cfg.network_type, cfg.lokr_factor, cfg.decompose_both, cfg.full_matrix) == ("lokr", 8, True, False)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.conv_rank, cfg.conv_alpha) == (8, 4, 4, 2)
    assert cfg.target_modules == "locon"  # LyCORIS' preset full adapts the ResNet convs too
    module, args = network_metadata(cfg, {})
    assert module == "lycoris.kohya"
    assert (args["algo"], args["factor"], args["decompose_both"], args["full_matrix"]) == ("lokr", "8", "True", "False")


def test_lokr_full_matrix_and_lowercase_booleans(tmp_path):
    cfg = _toml(tmp_path, "algo=lokr", "full_matrix=true", "decompose_both=false")
    assert (cfg.network_type, cfg.full_matrix, cfg.decompose_both, cfg.lokr_factor) == ("lokr", True, False, -1)


def test_loha_takes_lycoris_conv_defaults(tmp_path):
    """LyCORIS: conv_dim defaults to network_dim and conv_alpha to network_alpha (ours: conv_rank/2)."""
    cfg = _toml(tmp_path, "algo=loha")
    assert (cfg.network_type, cfg.target_modules) == ("loha", "locon")
    assert (cfg.conv_dim, cfg.conv_alpha_value) == (8, 4)
    assert network_metadata(cfg, {})[1]["algo"] == "loha"


@pytest.mark.parametrize("preset,targets", [("full", "locon"), ("attn-mlp", "kohya"), ("attn-only", "attention")])
def test_lycoris_presets_pick_the_layers(tmp_path, preset, targets):
    assert _toml(tmp_path, "algo=loha", f"preset={preset}").target_modules == targets


def test_dora_from_lycoris_and_from_networks_lora_is_said(caplog):
    caplog.set_level(logging.INFO, logger="engine.config")
    cfg = TrainConfig.from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True"]})
    assert (cfg.network_type, cfg.target_modules) == ("dora", "locon")
    assert network_metadata(cfg, {})[1]["dora_wd"] == "True"
    assert any("per input channel" in r.getMessage() for r in caplog.records)  # LyCORIS' default is per output
    caplog.clear()
    cfg = TrainConfig.from_dict({"network_module": "networks.lora", "network_args": ["dora_wd=True", "conv_dim=4"]})
    assert (cfg.network_type, cfg.target_modules, cfg.conv_rank) == ("dora", "locon", 4)
    assert any("networks.lora has no DoRA" in r.getMessage() for r in caplog.records)


def test_lora_and_locon_through_lycoris_keep_their_dropout():
    cfg = TrainConfig.from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dropout=0.1"]})
    assert (cfg.network_type, cfg.lora_dropout) == ("locon", 0.1)


@pytest.mark.parametrize("module,args,message", [
    ("networks.lora", ["algo=loha"], "network_module = \"lycoris.kohya\""),
    ("lycoris.kohya", ["algo=ia3"], "algo=ia3 is not supported"),
    ("lycoris.kohya", ["algo=lokr", "dora_wd=True"], "dora_wd=True with algo=lokr"),
    ("lycoris.kohya", ["algo=loha", "dropout=0.1"], "lora_dropout is for LoRA/LoCon"),
    ("lycoris.kohya", ["algo=lokr", "use_tucker=True"], "use_tucker"),
    ("lycoris.kohya", ["algo=lokr", "rank_dropout=0.2"], "rank_dropout=0.2 is not supported"),
    ("lycoris.kohya", ["algo=lokr", "preset=unet-convblock-only"], "preset=unet-convblock-only"),
])
def test_what_we_do_not_train_is_refused_by_name(module, args, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"network_module": module, "network_args": args})


def test_lycoris_switches_left_off_are_accepted():
    cfg = TrainConfig.from_dict({"network_module": "lycoris.kohya",
                                 "network_args": ["algo=lokr", "rank_dropout=0", "use_tucker=False", "bypass_mode=False"]})
    assert cfg.network_type == "lokr"
