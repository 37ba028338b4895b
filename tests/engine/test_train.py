"""End to end on tiny models: the LoRA learns, resume is exact, stops keep a checkpoint, the model
passed in comes back bit-identical, and the file carries kohya's metadata."""

import shutil

import pytest
import torch
from safetensors import safe_open

from engine.errors import NonFiniteLoss, TrainingStopped
from engine.events import FunctionCallback
from engine.lora.kohya_io import read_lora, to_network_keys
from engine.lora.targets import build_network
from engine.models import tiny_sd1, tiny_sdxl
from engine.train import train

from train_fixtures import eval_loss, model_fingerprint, pattern_dataset, quick_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("data") / "图片 set")


def _apply(model, cfg, path):
    net = build_network(model, cfg)
    tensors, _ = read_lora(path)
    loaded, _ = net.load_kohya_state_dict(to_network_keys(net, tensors)[0])
    assert len(loaded) == len(net)
    return net


def test_loss_falls_by_half(data, tmp_path):
    model = tiny_sd1()
    cfg = quick_config(data, tmp_path, max_train_steps=60, batch_size=4, learning_rate=3e-3,
                       target_modules="locon", min_snr_gamma=0, lr_scheduler="constant")
    before = eval_loss(model, data)
    result = train(cfg, model)
    with _apply(model, cfg, result.lora_path).applied():
        after = eval_loss(model, data)
    assert after < before / 2, (before, after)
    assert eval_loss(model, data) == before  # hooks gone: the base model predicts as before


def test_resume_is_exact(data, tmp_path):
    straight = train(quick_config(data, tmp_path / "a", max_train_steps=10, save_steps=5), tiny_sd1())
    checkpoint = tmp_path / "a" / "test_lora" / "checkpoints" / "step-00000005"
    assert checkpoint.is_dir()
    copy = tmp_path / "b" / "test_lora" / "checkpoints" / "step-00000005"
    shutil.copytree(checkpoint, copy)
    resumed = train(quick_config(data, tmp_path / "b", max_train_steps=10, resume_from_checkpoint="latest"), tiny_sd1())
    assert resumed.steps == 10
    assert straight.tensors.keys() == resumed.tensors.keys()
    for key, value in straight.tensors.items():
        assert torch.equal(value, resumed.tensors[key]), key
    assert straight.losses[5:] == resumed.losses


def test_stop_keeps_checkpoint_and_resume_finishes_the_same_run(data, tmp_path):
    straight = train(quick_config(data, tmp_path / "a", max_train_steps=6), tiny_sdxl())
    events = []
    stopper = FunctionCallback(on_event=events.append, should_stop=lambda: any(e.kind == "step" and e.step == 3 for e in events))
    with pytest.raises(TrainingStopped) as info:
        train(quick_config(data, tmp_path / "b", max_train_steps=6), tiny_sdxl(), callbacks=[stopper])
    assert info.value.checkpoint and info.value.checkpoint.endswith("step-00000003")
    assert [e.kind for e in events][-1] == "stopped"
    assert not (tmp_path / "b" / "test_lora" / "test_lora.safetensors").exists()
    resumed = train(quick_config(data, tmp_path / "b", max_train_steps=6, resume_from_checkpoint="latest"), tiny_sdxl())
    for key, value in straight.tensors.items():
        assert torch.equal(value, resumed.tensors[key]), key


@pytest.mark.parametrize("ending", ["finished", "failed", "cancelled"])
def test_model_passed_in_is_bit_identical_afterwards(data, tmp_path, ending):
    model = tiny_sd1(owns_weights=False)
    model.unet.train()  # a host may hand over a module in train mode; it must come back that way
    before = model_fingerprint(model)

    def on_event(event):
        if ending == "failed" and event.kind == "step" and event.step == 2:
            raise RuntimeError("host error in the middle of a run")

    callback = FunctionCallback(on_event=on_event, should_stop=lambda: ending == "cancelled")
    cfg = quick_config(data, tmp_path, gradient_checkpointing=True, train_text_encoder=True)
    if ending == "finished":
        train(cfg, model, callbacks=[callback])
    else:
        with pytest.raises((RuntimeError, TrainingStopped)):
            train(cfg, model, callbacks=[callback])
    assert model_fingerprint(model) == before


def test_nan_loss_stops_with_advice_and_keeps_last_checkpoint(data, tmp_path):
    model = tiny_sd1()

    def poison(event):
        if event.kind == "step" and event.step == 3:
            with torch.no_grad():
                for p in model.unet.parameters():
                    p.fill_(float("nan"))
                    break

    cfg = quick_config(data, tmp_path, max_train_steps=8, save_steps=2, nan_guard_steps=0)  # the guard off
    with pytest.raises(NonFiniteLoss, match="step-00000002") as info:
        train(cfg, model, callbacks=[FunctionCallback(on_event=poison)])
    assert "mixed_precision" in str(info.value)
    assert (tmp_path / "test_lora" / "checkpoints" / "step-00000002").is_dir()
    assert not (tmp_path / "test_lora" / "test_lora.safetensors").exists()


def test_file_has_kohya_metadata_and_keys(data, tmp_path):
    cfg = quick_config(data, tmp_path, trigger_word="ohwx", train_text_encoder=True, save_precision="fp16")
    result = train(cfg, tiny_sdxl())
    with safe_open(str(result.lora_path), "pt") as fh:
        md = fh.metadata()
        keys = set(fh.keys())
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8.0"
    assert md["ss_output_name"] == "test_lora" and md["modelspec.trigger_phrase"] == "ohwx"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert '"ohwx"' in md["ss_tag_frequency"] and "n_repeats" in md["ss_dataset_dirs"]
    assert len(md["sshs_model_hash"]) == 64
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL keys use LDM names, as kohya
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert (tmp_path / "test_lora" / "test_lora.config.yaml").is_file()
    assert (tmp_path / "test_lora" / "loss.png").is_file()


def test_continue_from_an_existing_lora(data, tmp_path):
    first = train(quick_config(data, tmp_path / "a", max_train_steps=3), tiny_sd1())
    model = tiny_sd1()
    second = train(quick_config(data, tmp_path / "b", max_train_steps=1, learning_rate=0.0,
                                network_weights=str(first.lora_path)), model)
    for key, value in first.tensors.items():
        assert torch.equal(value, second.tensors[key]), key
