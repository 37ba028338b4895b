"""A kohya / lora-scripts user's own config loads as it is, means what it meant there, and trains.

The example configs below are the published text of lora-scripts' config/default.toml and
config/lora.toml (Akegarasu/lora-scripts fdefba9) and of kohya's docs/train_network.md command line
written as the TOML `--output_config` makes of it, with its docs/config_README-en.md dataset config
(sd-scripts 48d368f); only paths are replaced (the built-in demo model, a temporary dataset).
"""

import logging
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.__main__ import main
from engine.config import TrainConfig, load_config
from engine.config_io import _ALIASES, _FIELDS, _SPECIAL
from engine.config_kohya import CONVERTED, IGNORED, UNSUPPORTED
from engine.errors import ConfigError
from engine.models.demo_model import DEMO_MODEL_FILE

from train_fixtures import pattern_dataset

FIXTURES = Path(__file__).parent / "fixtures"

LORA_SCRIPTS_DEFAULT = """\
[model]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "{model}"

[dataset]
train_data_dir = "{data}"
reg_data_dir = ""
prior_loss_weight = 1
cache_latents = true
shuffle_caption = true
enable_bucket = true

[additional_network]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer]
unet_lr = 1e-4
text_encoder_lr = 1e-5
optimizer_type = "AdamW8bit"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 1

[training]
resolution = "512,512"
train_batch_size = 1
max_train_epochs = 10
noise_offset = 0.0
keep_tokens = 0
xformers = true
lowram = false
clip_skip = 2
mixed_precision = "fp16"
save_precision = "fp16"

[sample_prompt]
sample_sampler = "euler_a"
sample_every_n_epochs = 1

[saving]
output_name = "output_name"
save_every_n_epochs = 1
save_n_epoch_ratio = 0
save_last_n_epochs = 499
save_state = false
save_model_as = "safetensors"
output_dir = "{out}"
logging_dir = "{logs}"
log_prefix = "output_name"

[others]
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
max_token_length = 225
seed = 1337
"""

LORA_SCRIPTS_LORA = """\
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "{model}"

[dataset_arguments]
train_data_dir = "{data}"
reg_data_dir = ""
resolution = "512,512"
prior_loss_weight = 1

[additional_network_arguments]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer_arguments]
unet_lr = 1e-4
text_encoder_lr = 1e-5

optimizer_type = "AdamW8bit"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 1

[training_arguments]
train_batch_size = 1
noise_offset = 0.0
keep_tokens = 0
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
max_token_length = 225
seed = 1337
xformers = true
lowram = false
max_train_epochs = 10
resolution = "512,512"
clip_skip = 2
mixed_precision = "fp16"

[sample_prompt_arguments]
sample_sampler = "euler_a"
sample_every_n_epochs = 5

[saving_arguments]
output_name = "output_name"
save_every_n_epochs = 1
save_state = false
save_model_as = "safetensors"
output_dir = "{out}"
logging_dir = "{logs}"
log_prefix = ""
save_precision = "fp16"

[others]
cache_latents = true
shuffle_caption = true
enable_bucket = true
"""

# docs/train_network.md's command line, as the TOML kohya's --output_config writes
KOHYA_DOCS = """\
pretrained_model_name_or_path = "{model}"
dataset_config = "{dataset_config}"
output_dir = "{out}"
output_name = "my_lora"
save_model_as = "safetensors"
network_module = "networks.lora"
network_dim = 16
network_alpha = 1
learning_rate = 1e-4
optimizer_type = "AdamW8bit"
lr_scheduler = "constant"
sdpa = true
max_train_epochs = 10
save_every_n_epochs = 1
mixed_precision = "fp16"
gradient_checkpointing = true
"""

# docs/config_README-en.md's example, as published (two datasets, two training subsets)
KOHYA_DATASET_DOCS = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{data}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{data}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{data}'
  metadata_file = '{data}/piyo_md.json'
"""
# ... its first dataset with one training subset: what this trainer reads
KOHYA_DATASET_ONE = KOHYA_DATASET_DOCS.split("  [[datasets.subsets]]\n  image_dir = '{data}'\n  class_tokens = 'fuga")[0] + \
    "  [[datasets.subsets]]\n  is_reg = true\n  image_dir = '{reg}'\n  class_tokens = 'human'\n  keep_tokens = 1\n"

# On a CPU test machine: no xformers, no bitsandbytes, fp32 (CPU fp16 autocast is slow), 2 steps at the
# demo model's 64 px. Everything else is the file's.
CPU = ["--set", "xformers=false", "--set", "optimizer_type=AdamW", "--set", "mixed_precision=no", "--set",
       "resolution=64", "--set", "max_train_steps=2", "--set", "min_bucket_reso=64"]


def _write(tmp_path: Path, template: str, name: str = "config.toml", **paths) -> Path:
    values = {"model": DEMO_MODEL_FILE.as_posix(), "data": (tmp_path / "data").as_posix(),
              "out": (tmp_path / "out").as_posix(), "logs": (tmp_path / "logs").as_posix(),
              "reg": (tmp_path / "reg").as_posix(), **paths}
    path = tmp_path / name
    path.write_text(template.format(**values), encoding="utf-8")
    return path


def _te_keys(lora: Path) -> int:
    with safe_open(str(lora), framework="pt") as f:
        return sum(k.startswith("lora_te") for k in f.keys())


def test_every_kohya_key_is_mapped_ignored_or_refused_by_name():
    keys = [line.strip() for line in (FIXTURES / "kohya_train_network_keys.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(keys) > 190
    handled = set(_FIELDS) | set(_ALIASES) | set(_SPECIAL) | set(IGNORED) | set(UNSUPPORTED) | CONVERTED
    assert [k for k in keys if k not in handled] == []
    assert not set(IGNORED) & set(UNSUPPORTED)


@pytest.mark.parametrize("template", [LORA_SCRIPTS_DEFAULT, LORA_SCRIPTS_LORA], ids=["default.toml", "lora.toml"])
def test_lora_scripts_configs_load_with_their_meaning(tmp_path, template, caplog):
    caplog.set_level(logging.INFO, logger="engine.config")
    cfg = load_config(_write(tmp_path, template))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate, cfg.text_encoder_lr) == (32, 16, 1e-4, 1e-5)
    assert cfg.train_text_encoder  # kohya trains it unless network_train_unet_only
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.lr_scheduler_num_cycles, cfg.warmup_steps) == \
        ("AdamW8bit", "cosine_with_restarts", 1, 0)
    assert (cfg.attention, cfg.clip_skip, cfg.max_token_length, cfg.mixed_precision) == ("xformers", 2, 225, "fp16")
    assert (cfg.batch_size, cfg.epochs, cfg.seed, cfg.prediction_type, cfg.resolution) == (1, 10, 1337, "epsilon", "512,512")
    assert (cfg.log_with, cfg.logging_dir) == ("tensorboard", (tmp_path / "logs").as_posix())
    assert cfg.shuffle_caption and cfg.cache_latents == "memory" and cfg.output_name == "output_name"
    lines = [r.getMessage() for r in caplog.records if "not used here" in r.getMessage()]
    assert len(lines) == 1 and "sample_sampler" in lines[0] and "lowram" not in lines[0]


@pytest.mark.parametrize("template", [LORA_SCRIPTS_DEFAULT, LORA_SCRIPTS_LORA], ids=["default.toml", "lora.toml"])
def test_lora_scripts_configs_train(tmp_path, template, capsys):
    pattern_dataset(tmp_path / "data" / "5_ohwx", n=2)
    config = _write(tmp_path, template)
    assert main(["train", "--config", str(config)] + CPU) == 0
    lora = tmp_path / "out" / "output_name" / "output_name.safetensors"
    assert lora.is_file() and _te_keys(lora) > 0, capsys.readouterr()
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_kohya_docs_example_trains_with_its_dataset_config(tmp_path):
    pattern_dataset(tmp_path / "data", n=2)
    pattern_dataset(tmp_path / "reg", n=2)
    dataset = _write(tmp_path, KOHYA_DATASET_ONE, "my_dataset_config.toml")
    config = _write(tmp_path, KOHYA_DOCS, dataset_config=dataset.as_posix())
    cfg = load_config(config)
    assert (cfg.train_data_dir, cfg.reg_data_dir) == ((tmp_path / "data").as_posix(), (tmp_path / "reg").as_posix())
    assert (cfg.batch_size, cfg.keep_tokens, cfg.shuffle_caption, cfg.resolution) == (4, 2, True, "512")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lr_scheduler, cfg.train_text_encoder, cfg.text_encoder_lr) == \
        (16, 1, "constant", True, 1e-4)
    assert main(["train", "--config", str(config)] + CPU) == 0
    assert _te_keys(tmp_path / "out" / "my_lora" / "my_lora.safetensors") > 0


def test_kohya_dataset_config_with_several_folders_says_how_to_arrange_them(tmp_path):
    dataset = _write(tmp_path, KOHYA_DATASET_DOCS, "my_dataset_config.toml")
    config = _write(tmp_path, KOHYA_DOCS, dataset_config=dataset.as_posix())
    with pytest.raises(ConfigError, match=r"has 2 \[\[datasets\]\]; one is read here"):
        load_config(config)


def test_our_yaml_keeps_its_text_encoder_default_and_kohya_unet_only_is_honoured():
    assert not TrainConfig.from_dict({"network_dim": 8, "text_encoder_lr": 1e-5}).train_text_encoder
    kohya = {"network_module": "networks.lora", "learning_rate": 2e-4}
    cfg = TrainConfig.from_dict(kohya)
    assert cfg.train_text_encoder and cfg.text_encoder_lr == 2e-4  # kohya: the TE trains at learning_rate
    assert not TrainConfig.from_dict({**kohya, "network_train_unet_only": True}).train_text_encoder
    assert not TrainConfig.from_dict({"training_arguments": {"network_train_unet_only": True}}).train_text_encoder


def test_unet_lr_and_learning_rate_must_agree():
    with pytest.raises(ConfigError, match=r"unet_lr \(0.0002\) and learning_rate \(0.0001\)"):
        TrainConfig.from_dict({"unet_lr": 2e-4, "learning_rate": 1e-4})
    assert TrainConfig.from_dict({"unet_lr": 1e-4, "learning_rate": 1e-4}).learning_rate == 1e-4
    assert TrainConfig.from_dict({"unet_lr": 3e-4}).learning_rate == 3e-4


@pytest.mark.parametrize("value", [False, "no", "fp32", "NO", "float32"])
def test_mixed_precision_no_and_fp32(value):
    assert TrainConfig.from_dict({"mixed_precision": value}).mixed_precision == "no"


def test_yaml_mixed_precision_no(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("mixed_precision: no\n", encoding="utf-8")
    assert load_config(path).mixed_precision == "no"


def test_network_module_and_args():
    locon = TrainConfig.from_dict({"network_module": "networks.lora", "network_args": ["conv_dim=8", "conv_alpha=4"]})
    assert (locon.target_modules, locon.conv_rank, locon.conv_alpha) == ("locon", 8, 4)
    lycoris = TrainConfig.from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "conv_dim=4"]})
    assert (lycoris.target_modules, lycoris.conv_rank) == ("locon", 4)
    with pytest.raises(ConfigError, match="algo=ia3 is not supported"):  # LoHa/LoKr/DoRA: test_kohya_lycoris_configs
        TrainConfig.from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]})
    with pytest.raises(ConfigError, match="network_module 'networks.dylora' is not supported"):
        TrainConfig.from_dict({"network_module": "networks.dylora"})
    with pytest.raises(ConfigError, match="network_args rank_dropout=.* is not supported"):
        TrainConfig.from_dict({"network_args": ["rank_dropout=0.1"]})
    assert TrainConfig.from_dict({"network_args": ["block_dims=2,4,4"]}).block_dims == "2,4,4"  # block-wise ranks
    opt = TrainConfig.from_dict({"optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99"]})
    assert opt.optimizer_args == {"weight_decay": 0.1, "betas": (0.9, 0.99)}


def test_features_we_lack_are_refused_when_on_and_accepted_when_off():
    TrainConfig.from_dict({"masked_loss": False, "loss_type": "l2", "multires_noise_iterations": 0, "vae": ""})
    with pytest.raises(ConfigError, match="debiased_estimation_loss = True is not supported here"):
        TrainConfig.from_dict({"debiased_estimation_loss": True})
    with pytest.raises(ConfigError, match="loss_type = 'huber'"):
        TrainConfig.from_dict({"loss_type": "huber"})
    with pytest.raises(ConfigError, match="save_model_as 'ckpt'"):
        TrainConfig.from_dict({"save_model_as": "ckpt"})


def test_ignored_keys_are_named_once_with_their_reason(caplog):
    caplog.set_level(logging.INFO, logger="engine.config")
    TrainConfig.from_dict({"lowram": True, "max_data_loader_n_workers": 4, "persistent_data_loader_workers": False})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "lowram: memory and speed" in lines[0] and "max_data_loader_n_workers" in lines[0]
    assert "persistent_data_loader_workers" not in lines[0]  # off: nothing is ignored


def test_sections_may_not_disagree_and_set_takes_kohya_keys(tmp_path):
    with pytest.raises(ConfigError, match="'resolution' is set twice"):
        TrainConfig.from_dict({"dataset_arguments": {"resolution": 512}, "training_arguments": {"resolution": 768}})
    assert TrainConfig(attention="xformers").with_overrides(["xformers=false"]).attention == "sdpa"
    assert TrainConfig().with_overrides(["unet_lr=3e-4"]).learning_rate == 3e-4
