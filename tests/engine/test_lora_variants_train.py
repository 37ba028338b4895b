"""LoHa, LoKr and DoRA trained end to end on a tiny SD1 model: the model passed in comes back
bit-identical, the LoRA learns, the file says what it is, continuing from it starts exactly where it
ended, and the fast step (what the CUDA graph replays) trains exactly like the plain one."""

import json

import pytest
import torch

from engine.errors import UserError
from engine.events import FunctionCallback
from engine.lora.kohya_io import read_lora, to_network_keys
from engine.lora.targets import build_network
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import FAST_ON_CPU, eval_loss, model_fingerprint, pattern_dataset, quick_config

VARIANTS = {"loha": {"network_type": "loha"},
            "lokr": {"network_type": "lokr", "lokr_factor": 4, "decompose_both": True},
            "dora": {"network_type": "dora"}}
FIRST_KEY = {"loha": "hada_w1_a", "lokr": "lokr_w1", "dora": "dora_scale"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One 12-step run per variant on the locon layers (3x3 convs included), text encoder trained."""
    out = {}
    for name, options in VARIANTS.items():
        model = tiny_sd1()
        before_fp, before_loss = model_fingerprint(model), eval_loss(model, data)
        cfg = quick_config(data, tmp_path_factory.mktemp(name), max_train_steps=12, batch_size=4, learning_rate=3e-3,
                           target_modules="locon", train_text_encoder=True, min_snr_gamma=0, lr_scheduler="constant",
                           lora_rank=4, lora_alpha=4, **options)
        result = train(cfg, model)
        out[name] = {"model": model, "cfg": cfg, "result": result, "before": before_fp,
                     "after": model_fingerprint(model), "loss_before": before_loss}
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_host_model_is_bit_identical_after_training(runs, name):
    assert runs[name]["after"] == runs[name]["before"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_variant_learns_and_its_file_says_what_it_is(runs, data, name):
    run = runs[name]
    model, cfg, result = run["model"], run["cfg"], run["result"]
    tensors, metadata = read_lora(result.lora_path)
    assert any(k.endswith(FIRST_KEY[name]) for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors) and any("resnets" in k for k in tensors)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == {"dora": "locon"}.get(name, name)
    net = build_network(model, cfg)
    loaded, _ = net.load_kohya_state_dict(to_network_keys(net, tensors)[0])
    assert len(loaded) == len(net)
    with net.applied():
        after = eval_loss(model, data)
    assert after < 0.92 * run["loss_before"], (run["loss_before"], after)
    assert eval_loss(model, data) == run["loss_before"]  # hooks gone: the base model predicts as before


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_continuing_from_the_file_starts_from_its_weights(runs, tmp_path, name):
    """network_weights with a learning rate of 0: the written file holds exactly what was read."""
    run = runs[name]
    cfg = run["cfg"].replace(network_weights=str(run["result"].lora_path), learning_rate=0.0, text_encoder_lr=0.0,
                             max_train_steps=1, output_dir=str(tmp_path), save_precision="fp16",
                             lokr_factor=-1, decompose_both=False)  # the file's split wins over the config's
    messages = []
    result = train(cfg, tiny_sd1(), callbacks=[FunctionCallback(lambda event: messages.append(event.message or ""))])
    first, _ = read_lora(run["result"].lora_path)
    again, _ = read_lora(result.lora_path)
    assert any("continuing from" in m for m in messages)
    assert first.keys() == again.keys()
    for key, value in first.items():
        assert torch.equal(value.to(again[key].dtype), again[key]), key


def test_a_file_of_another_kind_is_refused_by_name(runs, tmp_path):
    cfg = runs["lokr"]["cfg"].replace(network_type="loha", network_weights=str(runs["lokr"]["result"].lora_path),
                                      output_dir=str(tmp_path))
    model = tiny_sd1()
    before = model_fingerprint(model)
    with pytest.raises(UserError, match="is a LoKr file.*network_type: lokr"):
        train(cfg, model)
    assert model_fingerprint(model) == before


@pytest.mark.parametrize("name", ["lokr", "dora"])  # LoHa goes through LoKr's path (weight_delta.py)
def test_fast_step_trains_like_the_plain_step(data, tmp_path, name):
    """FastStep without the graph (the CPU stand-in for the CUDA graph) gives the plain loss curve."""
    options = dict(max_train_steps=3, lora_rank=4, lora_alpha=4, lr_scheduler="constant", **VARIANTS[name])
    plain = train(quick_config(data, tmp_path / "plain", **options), tiny_sd1())
    fast = train(quick_config(data, tmp_path / "fast", **options), tiny_sd1(), options=FAST_ON_CPU)
    assert plain.fast_steps == 0 and fast.fast_steps == 3, "the fast step was not taken"
    assert all(abs(a - b) <= 1e-5 * max(abs(a), 1e-8) for a, b in zip(plain.losses, fast.losses)), \
        (plain.losses, fast.losses)
    for key, value in plain.tensors.items():
        assert torch.allclose(value, fast.tensors[key], rtol=1e-4, atol=1e-6), key
