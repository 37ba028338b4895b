"""The command line a user types: a real run from a YAML file, and one clear line for each mistake."""

import pytest
from safetensors.torch import save_file

from engine.__main__ import main

from train_fixtures import pattern_dataset, tiny_diffusers_folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The tiny SD1 model saved as a diffusers folder, under a path with a space and Chinese characters."""
    return tiny_diffusers_folder(tmp_path_factory.mktemp("models") / "小模型 tiny")


def _config(tmp_path, text):
    path = tmp_path / "my config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_train_from_yaml_writes_the_lora_and_resolved_config(tmp_path, base_model, capsys):
    data = pattern_dataset(tmp_path / "训练 data")
    config = _config(tmp_path, f"model_config:\n  base_model: '{base_model}'\ntrain_config:\n"
                               f"  train_data_dir: '{data}'\n  network_dim: 4\n  max_train_steps: 3\n  resolution: 64\n")
    out = tmp_path / "输出 out"
    assert main(["train", "--config", config, "--set", f"output_dir={out}", "--set", "output_name=style"]) == 0
    lora = out / "style" / "style.safetensors"
    assert lora.is_file() and (out / "style" / "style.config.yaml").is_file()
    assert "<lora:style:0.8>" in capsys.readouterr().out
    assert main(["inspect", str(lora)]) == 0
    printed = capsys.readouterr().out
    assert "rank [4]" in printed and "ss_base_model_version = sd_v1" in printed


@pytest.mark.parametrize("setup,message", [
    ("unknown_key", "unknown key 'learning_rat'. Did you mean 'learning_rate'?"),
    ("missing_dir", "train_data_dir points to"),
    ("empty_dir", "No training images in"),
    ("corrupt_only", "broken.png"),
    ("lora_as_base", "LoRA"),
    ("bad_value", "optimizer is 'adam'; allowed"),
])
def test_mistakes_give_one_clear_line(tmp_path, base_model, capsys, setup, message):
    data = tmp_path / "data"
    data.mkdir()
    extra = ""
    base = base_model
    if setup == "unknown_key":
        extra = "learning_rat: 0.1\n"
    elif setup == "missing_dir":
        data = tmp_path / "nowhere"
    elif setup == "corrupt_only":
        (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif setup == "lora_as_base":
        pattern_dataset(data, n=2)
        base = tmp_path / "some_lora.safetensors"
        import torch
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)},
                  str(base))
    elif setup == "bad_value":
        extra = "optimizer: adam\n"
    config = _config(tmp_path, f"base_model: '{base}'\ntrain_data_dir: '{data}'\nmax_train_steps: 1\n"
                               f"resolution: 64\noutput_dir: '{tmp_path / 'out'}'\n{extra}")
    assert main(["train", "--config", config]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err


def test_a_caption_in_another_encoding_stops_neither_check_nor_train_and_is_named_once(tmp_path, base_model,
                                                                                       capsys):
    data = pattern_dataset(tmp_path / "data", n=2)
    (data / "img0.txt").write_bytes("风格, 红色".encode("gbk"))
    assert main(["check", str(data)]) == 0
    report = capsys.readouterr().out
    assert report.count("img0.txt (probably GBK)") == 1 and "Problems (" in report
    config = _config(tmp_path, f"base_model: '{base_model}'\ntrain_data_dir: '{data}'\nmax_train_steps: 1\n"
                               f"resolution: 64\noutput_dir: '{tmp_path / 'out'}'\n")
    assert main(["train", "--config", config]) == 0
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("img0.txt (probably GBK)") == 1
