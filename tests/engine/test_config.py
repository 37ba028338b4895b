"""The config schema: lora-scripts/kohya keys accepted, every mistake explained."""

import pytest

from engine.config import TrainConfig, dump_config, load_config
from engine.errors import ConfigError


def test_grouped_and_aliased_keys(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "model_config:\n  pretrained_model_name_or_path: /m.safetensors\n"
        "train_config:\n  network_dim: 32\n  network_alpha: 16\n  train_batch_size: 2\n"
        "  max_train_epochs: 3\n  optimizer_type: lion\n  use_fp16: true\n  lr_warmup_steps: 0.1\n",
        encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.base_model, cfg.lora_rank, cfg.lora_alpha, cfg.batch_size, cfg.epochs) == ("/m.safetensors", 32, 16, 2, 3)
    assert cfg.optimizer == "Lion" and cfg.mixed_precision == "fp16" and cfg.warmup_steps == 0.1


def test_defaults_are_the_fields_settled_ones():
    cfg = TrainConfig()
    assert (cfg.lora_rank, cfg.alpha, cfg.learning_rate, cfg.optimizer, cfg.lr_scheduler) == (16, 8.0, 1e-4, "AdamW", "cosine")


@pytest.mark.parametrize("data,message", [
    ({"learning_rat": 1e-4}, "Did you mean 'learning_rate'"),
    ({"netwrk_dim": 8}, "Did you mean 'lora_rank'"),
    ({"optimizer": "sgd"}, "allowed: AdamW, AdamW8bit, Lion, Adafactor, Prodigy"),
    ({"lora_rank": 0}, "at least 1"),
    ({"batch_size": "two"}, "whole number"),
    ({"flip_aug": "maybe"}, "true or false"),
    ({"warmup_steps": 2.5}, "step count"),
    ({"resolution": "big"}, "resolution must be"),
    ({"output_name": "../escape"}, "plain file name"),
    ({"target_modules": "everything"}, "target_modules must be one of"),
])
def test_mistakes_are_explained(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_set_overrides_parse_yaml_values():
    cfg = TrainConfig().with_overrides(["lora_rank=32", "flip_aug=true", "target_modules=[to_q, to_v]", "learning_rate=2e-4"])
    assert cfg.lora_rank == 32 and cfg.flip_aug is True and cfg.target_modules == ["to_q", "to_v"] and cfg.learning_rate == 2e-4
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().with_overrides(["lora_rank"])


def test_missing_paths_name_their_key(tmp_path):
    cfg = TrainConfig(train_data_dir=str(tmp_path), base_model=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="base_model points to"):
        cfg.check_paths(need_base_model=True)
    cfg = TrainConfig(train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="train_data_dir points to"):
        cfg.check_paths(need_base_model=False)


def test_dump_round_trips(tmp_path):
    cfg = TrainConfig(lora_rank=4, trigger_word="ohwx 猫", sample_prompts=["a --d 3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg
