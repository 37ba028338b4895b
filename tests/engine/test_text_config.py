"""task_type: text-generation in the same YAML: its keys and defaults, the CLI's routing, bad model folders."""

import json

import pytest

from engine.__main__ import main
from engine.config import TrainConfig
from engine.errors import ConfigError, ModelError
from engine.text.cli import task_type_of, text_command, text_check_main, text_train_main
from engine.text.config import TextConfig, load_text_config
from engine.text.model import check_model_folder

from text_fixtures import one_thread, save_tiny_model, toy_lines, write_lines

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_lora_scripts_llm_ones():
    cfg = TextConfig()
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout) == (8, 16.0, "attention", 0.1)


def test_same_yaml_with_grouped_and_aliased_keys(tmp_path):
    path = tmp_path / "llm.yaml"
    path.write_text("model_config:\n  task_type: text-generation\n  pretrained_model_name_or_path: /m\n"
                    "train_config:\n  network_dim: 16\n  lora_target: all_linear\n  cutoff_len: 512\n"
                    "  per_device_train_batch_size: 4\n  num_train_epochs: 2\n  use_fp16: true\n", encoding="utf-8")
    cfg = load_text_config(path, ["learning_rate=1e-4"])
    assert (cfg.base_model, cfg.lora_rank, cfg.target_modules, cfg.max_length) == ("/m", 16, "all-linear", 512)
    assert (cfg.batch_size, cfg.epochs, cfg.mixed_precision, cfg.learning_rate) == (4, 2, "fp16", 1e-4)


@pytest.mark.parametrize("data,message", [
    ({"resolution": 512, "caption_extension": ".txt", "lora_rank": 4},
     "resolution, caption_extension are for image LoRAs and mean nothing with task_type: text-generation"),
    ({"max_lenght": 512}, "Did you mean 'max_length'"),
    ({"target_modules": "everything"}, "attention, all-linear or a list"),
    ({"long_samples": "wrap"}, "allowed: truncate, split, drop, error"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "choose one"),
    ({"lora_alpha": 0}, "above 0"),
])
def test_mistakes_are_explained(data, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_dict(data)


def test_the_example_config_is_a_text_config():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "configs" / "text" / "llm_lora.yaml"
    assert task_type_of(["--config", str(example)]) == "text-generation"
    cfg = load_text_config(example)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, cfg.gradient_accumulation_steps) == (8, 16.0,
                                                                                                    "attention", 4)


def test_the_cli_routes_on_task_type(tmp_path, capsys):
    text = tmp_path / "t.yaml"
    text.write_text("train_config:\n  task_type: text-generation\n", encoding="utf-8")
    image = tmp_path / "i.yaml"
    image.write_text("lora_rank: 4\n", encoding="utf-8")
    assert task_type_of(["--config", str(text)]) == "text-generation"
    assert task_type_of([f"--config={image}", "--set", "task_type=text-generation"]) == "text-generation"
    assert task_type_of(["--set", "task_type=image", "--config", str(text)]) == "image"
    assert text_command(["train", "--config", str(text)]) is text_train_main
    assert text_command(["check", "--config", str(text)]) is text_check_main
    assert text_command(["train", "--config", str(image)]) is None
    assert text_command(["train", "--config", str(tmp_path / "missing.yaml")]) is None
    assert main(["train", "--help-config", "--set", "task_type=text-generation"]) == 0
    printed = capsys.readouterr().out
    assert "max_length = 1024" in printed and "resolution" not in printed
    # the image path (ComfyUI, A1111) says where text runs go instead of training an image LoRA
    with pytest.raises(ConfigError, match="trains a language model from the command line"):
        TrainConfig.from_dict({"task_type": "text-generation"})
    assert TrainConfig.from_dict({"task_type": "image"}).task_type == "image"


def test_quantisation_needs_cuda_and_bitsandbytes():
    import torch

    from engine.text.model import quantization

    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
        quantization(TextConfig(load_in_4bit=True), torch.device("cpu"), torch.float32)
    assert quantization(TextConfig(), torch.device("cpu"), torch.float32) is None


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llm") / "tiny llama")


@pytest.mark.parametrize("setup,message", [
    ("file", "is a single file; text-generation needs a transformers model folder"),
    ("no_config", "has no config.json"),
    ("no_weights", "has config.json but no weights"),
    ("missing_shard", "missing 1 of the weight files"),
    ("adapter", "is a LoRA adapter, not a model"),
    ("remote_code", "runs its own Python code \\(modeling_custom.py\\).*trust_remote_code: true"),
])
def test_bad_model_folders_say_what_to_do(tmp_path, model_folder, setup, message):
    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((model_folder / "config.json").read_text())
    if setup == "file":
        folder = folder / "model.gguf"
        folder.write_bytes(b"GGUF")
    if setup in ("no_weights", "missing_shard", "remote_code"):
        (folder / "config.json").write_text(json.dumps(config))
    if setup == "missing_shard":
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    if setup == "adapter":
        (folder / "adapter_config.json").write_text("{}")
    if setup == "remote_code":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "my_llm",
                                                        "auto_map": {"AutoModelForCausalLM": "modeling_custom.X"}}))
        (folder / "model.safetensors").write_bytes(b"x")
        (folder / "modeling_custom.py").write_text("import os\n")
    with pytest.raises(ModelError, match=message):
        check_model_folder(folder, trust_remote_code=False)


def test_check_reports_tokens_long_lines_and_the_plan(tmp_path, model_folder, capsys):
    lines = toy_lines(40, seed=2) + ["the red cat " * 40]
    data = write_lines(tmp_path / "data.txt", lines)
    config = tmp_path / "llm.yaml"
    config.write_text(f"task_type: text-generation\nbase_model: '{model_folder}'\ntrain_data: '{data}'\n"
                      f"max_length: 64\nepochs: 2\n", encoding="utf-8")
    assert main(["check", "--config", str(config)]) == 0
    report = capsys.readouterr().out
    assert "41 samples (39 to train on, 2 held out for perplexity)" in report
    assert "Longer than max_length 64: 1 (truncate): data.txt line 41" in report
    assert "batches/epoch (batch 1, accumulation 1)" in report and "over 2 epochs" in report
    assert main(["check", "--config", str(config), "--set", "long_samples=error"]) == 2
    assert "Raise max_length" in capsys.readouterr().err
