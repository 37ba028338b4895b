"""The moving average of the LoRA weights (ema_decay, ema_start_step, ema_save): equal to its closed form
on a toy network and on a real (tiny) run, written instead of or beside the plain weights, and continued
exactly by a resumed run."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from engine.config import ConfigError, TrainConfig
from engine.lora.ema import LoRAEma
from engine.lora.network import LoRANetwork
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import FAST_ON_CPU, pattern_dataset, quick_config


def closed_form(weights: list[torch.Tensor], decay: float, start: int) -> torch.Tensor:
    """e_N = d^(N-k) w_k + sum_{j>k} (1-d) d^(N-j) w_j with k = start: the average after step N, where
    weights[j] are the weights after step j (weights[0]: the initial ones)."""
    n, k = len(weights) - 1, start
    total = decay ** (n - k) * weights[k].double()
    for j in range(k + 1, n + 1):
        total += (1 - decay) * decay ** (n - j) * weights[j].double()
    return total.float()


@pytest.mark.parametrize("start", [0, 3])
def test_the_average_is_its_closed_form_on_a_toy_network(start):
    network = LoRANetwork()
    network.add("lora_unet_x", nn.Linear(6, 5), rank=2, alpha=1.0)
    ema = LoRAEma(network, decay=0.9, start_step=start)
    g = torch.Generator().manual_seed(0)
    seen = [[p.detach().clone() for p in network.parameters()]]
    for step in range(1, 9):
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        seen.append([p.detach().clone() for p in network.parameters()])
        ema.update(step)
    for i, shadow in enumerate(ema.shadow):
        assert torch.allclose(shadow, closed_form([s[i] for s in seen], 0.9, start), atol=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig.from_dict({"ema_decay": 1.0})
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"ema_save": "sometimes"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("ema"), n=4)


def _plain(folder):
    return load_file(str(folder / "lora_fp32.safetensors"))


@pytest.mark.parametrize("options", [None, FAST_ON_CPU], ids=["plain_step", "fast_step"])
def test_a_run_writes_the_closed_form_beside_the_weights(data, tmp_path, options):
    cfg = quick_config(data, tmp_path, max_train_steps=5, save_steps=1, save_last_n_checkpoints=0, ema_decay=0.7,
                       ema_start_step=2)
    result = train(cfg, tiny_sd1(), options=options)
    out = tmp_path / "test_lora"
    per_step = [None] + [_plain(out / "checkpoints" / f"step-{s:08d}") for s in range(1, 5)] + [result.tensors]
    ema_file = out / "test_lora_ema.safetensors"
    averaged = load_file(str(ema_file))
    assert set(averaged) == set(result.tensors)
    for key in (k for k in averaged if not k.endswith(".alpha")):
        expected = closed_form([w[key] if w else None for w in per_step], 0.7, 2)  # w_0 unused (start 2)
        assert torch.allclose(averaged[key], expected, atol=1e-6), key
        assert torch.allclose(load_file(str(out / "test_lora.safetensors"))[key], result.tensors[key])
    assert not all(torch.equal(averaged[k], result.tensors[k]) for k in averaged)
    with safe_open(str(ema_file), "pt") as f:
        md = f.metadata()
    assert md["ss_ema"] == "True" and md["ss_ema_decay"] == "0.7" and md["ss_ema_start_step"] == "2"


def test_instead_writes_the_average_as_the_lora(data, tmp_path):
    beside = train(quick_config(data, tmp_path / "a", max_train_steps=3, ema_decay=0.5), tiny_sd1())
    instead = train(quick_config(data, tmp_path / "b", max_train_steps=3, ema_decay=0.5, ema_save="instead"), tiny_sd1())
    averaged = load_file(str(tmp_path / "a" / "test_lora" / "test_lora_ema.safetensors"))
    assert not (tmp_path / "b" / "test_lora" / "test_lora_ema.safetensors").exists()
    assert all(torch.equal(instead.tensors[k], averaged[k]) for k in averaged)
    assert not all(torch.equal(beside.tensors[k], averaged[k]) for k in averaged)


def test_resume_continues_the_same_average(data, tmp_path):
    opts = dict(max_train_steps=4, ema_decay=0.6, lr_scheduler="linear", warmup_steps=1)
    train(quick_config(data, tmp_path / "a", save_steps=2, **opts), tiny_sd1())
    folder = tmp_path / "a" / "test_lora" / "checkpoints" / "step-00000002"
    assert (folder / "ema_fp32.safetensors").is_file()
    shutil.copytree(folder, tmp_path / "b" / "test_lora" / "checkpoints" / folder.name)
    train(quick_config(data, tmp_path / "b", resume_from_checkpoint="latest", **opts), tiny_sd1())
    straight = load_file(str(tmp_path / "a" / "test_lora" / "test_lora_ema.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "test_lora" / "test_lora_ema.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
