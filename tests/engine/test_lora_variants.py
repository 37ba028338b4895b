"""LoHa, LoKr and DoRA: each update equals its closed form, starts at zero, trains only its own
parameters, goes through the per-step cast and the in-place add unchanged, and is written and read
back in LyCORIS' tensor names.

The closed forms are written out here independently of the modules (index arithmetic for the
Kronecker product, a per-column loop for DoRA's norm), so a wrong reshape or axis in the module fails.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.errors import ConfigError, UserError
from engine.lora.network import LoRANetwork
from engine.lora.variants import DoRAModule, LoHaModule, LoKrModule, check_file_type, factorization, file_network_type
from engine.lora.variants.lycoris_args import from_lycoris_args, network_metadata

FACTORIES = {"loha": LoHaModule, "lokr": LoKrModule, "dora": DoRAModule,
             # rank 1 with factor 4: both Kronecker factors low-rank on the test layers
             "lokr_low": lambda base, rank, alpha, dropout: LoKrModule(base, 1, alpha, dropout, factor=4,
                                                                       decompose_both=True)}


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1, stride=1)


def _input(base: nn.Module) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(3, 5, 64) if isinstance(base, nn.Linear) else torch.randn(2, 16, 6, 6)


def _base_out(base: nn.Module, x: torch.Tensor, delta: torch.Tensor | float = 0.0) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight + delta, base.bias)
    return F.conv2d(x, base.weight + delta, base.bias, padding=1)


def _trained(net: LoRANetwork, module, seed: int = 3):
    """Every factor moved off its initial value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module


def _network(base, factory, rank=4, alpha=2.0):
    net = LoRANetwork()
    return net, net.add("lora_unet_layer", base, rank, alpha, factory=factory)


# --- LoKr's split ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,factor,split", [
    (127, -1, (1, 127)), (128, -1, (8, 16)), (250, -1, (10, 25)), (512, -1, (16, 32)), (1024, -1, (32, 32)),
    (128, 2, (2, 64)), (128, 4, (4, 32)), (250, 8, (5, 50)), (1024, 16, (16, 64)),
    (360, -1, (18, 20)), (360, 16, (15, 24)), (320, -1, (16, 20)), (1280, -1, (32, 40)), (2048, -1, (32, 64))])
def test_lokr_split_is_lycoris(dim, factor, split):
    """LyCORIS' docstring table where its code agrees; 360 as its code (f49d30d) splits it (its table
    says 8x45). Checked against LyCORIS' own function for every size below 3000 and factor -1, 1..32."""
    assert factorization(dim, factor) == split


# --- closed forms ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_loha_update_is_the_hadamard_product(layer):
    base = _layer(layer)
    net, m = _network(base, LoHaModule, rank=4, alpha=2.0)
    _trained(net, m)
    w1 = m.hada_w1_a @ m.hada_w1_b
    w2 = m.hada_w2_a @ m.hada_w2_b
    expected = torch.empty_like(w1)
    for i in range(w1.shape[0]):  # elementwise, written out
        expected[i] = w1[i] * w2[i]
    expected = (expected * (2.0 / 4)).reshape(base.weight.shape)
    assert torch.allclose(m.delta_weight(), expected, atol=1e-6)
    x = _input(base)
    with net.applied():
        assert torch.allclose(base(x), _base_out(base, x, expected), atol=1e-5)


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron by index: out[i*b + k, j*d + l, ...] = w1[i, j] * w2[k, l, ...]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.empty(a * b, c * d, *w2.shape[2:])
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return out


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("options,rank,low_rank", [({}, 4, (False, False)), ({}, 2, (False, True)),
                                                  ({"factor": 4, "decompose_both": True}, 1, (True, True)),
                                                  ({"full_matrix": True}, 1, (False, False))])
def test_lokr_update_is_the_kronecker_product(layer, options, rank, low_rank):
    base = _layer(layer)
    net, m = _network(base, partial(LoKrModule, **options), rank=rank, alpha=3.0)
    assert m.low_rank == low_rank
    _trained(net, m)
    w1 = m.lokr_w1_a @ m.lokr_w1_b if low_rank[0] else m.lokr_w1
    if low_rank[1]:
        w2 = (m.lokr_w2_a @ m.lokr_w2_b).reshape(m.lokr_w2_a.shape[0], -1, *base.weight.shape[2:])
    else:
        w2 = m.lokr_w2
    scale = 3.0 / rank if any(low_rank) else 1.0  # both sides full: scale 1 (LyCORIS stores alpha = rank)
    expected = _kron(w1.detach(), w2.detach()) * scale
    assert expected.shape == base.weight.shape
    assert torch.allclose(m.delta_weight(), expected, atol=1e-5)
    assert float(m.alpha) == (3.0 if any(low_rank) else rank)
    x = _input(base)
    with net.applied():
        assert torch.allclose(base(x), _base_out(base, x, expected), atol=1e-4)


def test_lokr_sides_follow_lycoris_rules():
    """w2 low-rank when the rank is below half its larger side; w1 only with decompose_both."""
    big = nn.Linear(640, 320)  # out 320 = 16x20, in 640 = 20x32
    assert LoKrModule(big, 8, 1.0).low_rank == (False, True)  # 8 < 32/2
    assert LoKrModule(big, 16, 1.0).low_rank == (False, False)  # 16 >= 16: full w2, scale 1
    assert LoKrModule(big, 4, 1.0, decompose_both=True).low_rank == (True, True)  # 4 < 20/2
    m = LoKrModule(big, 8, 1.0)
    assert m.lokr_w1.shape == (16, 20) and m.lokr_w2_a.shape == (20, 8) and m.lokr_w2_b.shape == (8, 32)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_dora_is_magnitude_times_normalised_direction_per_input_channel(layer):
    base = _layer(layer)
    net, m = _network(base, DoRAModule, rank=4, alpha=2.0)
    _trained(net, m)
    w0 = base.weight.detach()
    merged = w0 + (m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)).reshape(w0.shape) * (2.0 / 4)
    magnitude = m.dora_scale.detach().reshape(-1)
    expected = torch.empty_like(merged)
    for j in range(w0.shape[1]):  # each input channel's column (a conv's with its kernel) gets norm m_j
        column = merged[:, j]
        expected[:, j] = column * magnitude[j] / column.norm()
    expected = expected - w0
    assert m.dora_scale.shape == ((1, 64) if layer == "linear" else (1, 16, 1, 1))
    assert torch.allclose(m.delta_weight(), expected, atol=1e-5)
    x = _input(base)
    with net.applied():
        assert torch.allclose(base(x), _base_out(base, x, expected), atol=1e-4)
    merged_new = w0 + m.delta_weight()
    norms = merged_new.transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1)
    assert torch.allclose(norms, magnitude, rtol=1e-5)  # the merged weight's column norms are the magnitude


def test_dora_magnitude_starts_at_the_base_weights_column_norms():
    base = _layer("linear")
    _, m = _network(base, DoRAModule)
    assert torch.allclose(m.dora_scale.reshape(-1), base.weight.detach().norm(dim=0), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_update_starts_at_zero_and_strength_scales_it(name, layer):
    base = _layer(layer)
    x = _input(base)
    plain = base(x)
    net, m = _network(base, FACTORIES[name])
    with net.applied():
        assert torch.equal(base(x), plain)  # exactly the base model before training (DoRA too)
    _trained(net, m)
    with net.applied():
        full = base(x)
    with net.applied(multiplier=0.4):
        part = base(x)
    with net.applied(multiplier=0.0):
        assert torch.equal(base(x), plain)
    assert not torch.allclose(full, plain)
    # the hosts add strength * (W' - W0): the hook at multiplier s does the same
    assert torch.allclose(part, plain + 0.4 * (full - plain), atol=1e-5)
    assert torch.equal(base(x), plain) and not base._forward_hooks


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_gradients_reach_every_factor_and_nothing_of_the_host(name):
    base = _layer("conv").requires_grad_(False)
    net, m = _network(base, FACTORIES[name])
    _trained(net, m)
    with net.applied():
        base(_input(base)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert base.weight.grad is None and base.bias.grad is None


# --- the step's fast paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_weights_cast_once_per_step_give_the_per_layer_casts(name):
    """`cast_weights` (one cast of every factor per step) = each layer casting its own, bf16 values and
    float32 gradients bit for bit."""
    base = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    net, m = _network(base, FACTORIES[name])
    _trained(net, m)
    x = _input(base).to(torch.bfloat16)

    def run(cast):
        net.zero_grad(set_to_none=True)
        with net.applied(), net.cast_weights(torch.bfloat16 if cast else None):
            y = base(x)
            y.float().square().sum().backward()
        return y, [p.grad.clone() for p in m.parameters()]

    y1, g1 = run(False)
    y2, g2 = run(True)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_in_place_add_equals_the_copying_add(name):
    """A Linear's update is added into the base output in place when the hook owns it: same values and
    gradients as the copying form (engine/lora/up_add.py)."""
    base = _layer("linear").requires_grad_(False)
    net, m = _network(base, FACTORIES[name])
    _trained(net, m)
    x = _input(base).requires_grad_(True)

    def run(in_place):
        net.zero_grad(set_to_none=True)
        x.grad = None
        y = m.apply_to(x, base(x), in_place=in_place)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in m.parameters()]

    copied, in_place = run(False), run(True)
    assert torch.allclose(copied[0], in_place[0], atol=1e-6) and torch.allclose(copied[1], in_place[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(copied[2], in_place[2]))


# --- files -------------------------------------------------------------------------------------------------
KEYS = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2", "alpha"},
        "lokr_low": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_file_keys_are_lycoris_and_load_back_exactly(name):
    base = _layer("conv")
    net, m = _network(base, FACTORIES[name])
    _trained(net, m)
    sd = net.kohya_state_dict()  # fp16, as saved
    assert {k.split(".", 1)[1] for k in sd} == KEYS[name]
    assert all(t.dtype == (torch.float32 if k.endswith("dora_scale") else torch.float16) for k, t in sd.items())
    assert file_network_type(sd) == name.split("_")[0]
    fresh, _ = _network(base, FACTORIES[name])
    loaded, unused = fresh.load_kohya_state_dict(sd)
    assert loaded == ["lora_unet_layer"] and not unused
    for key, value in fresh.kohya_state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_continuing_a_lokr_file_takes_its_split_and_rank():
    """A file made with another factor, rank or decompose_both: the module is rebuilt as the file is."""
    base = nn.Linear(640, 320)
    net, m = _network(base, partial(LoKrModule, factor=8, decompose_both=True), rank=4, alpha=1.0)
    _trained(net, m)
    sd = net.kohya_state_dict(None)
    other, _ = _network(base, LoKrModule, rank=16, alpha=16.0)
    other.match_file(sd)
    loaded, unused = other.load_kohya_state_dict(sd)
    assert loaded and not unused
    assert torch.equal(other.loras["lora_unet_layer"].delta_weight(), m.delta_weight())


def test_lycoris_output_axis_dora_is_refused_with_the_reason():
    base = _layer("linear")
    net, _ = _network(base, DoRAModule)
    sd = net.kohya_state_dict(None)
    sd["lora_unet_layer.dora_scale"] = torch.ones(48, 1)  # LyCORIS' default wd_on_output=True
    fresh, _ = _network(base, DoRAModule)
    with pytest.raises(ValueError, match="per output channel"):
        fresh.match_file(sd)


def test_file_kind_is_checked_before_continuing():
    base = _layer("linear")
    lokr = _network(base, LoKrModule)[0].kohya_state_dict()
    with pytest.raises(UserError, match="network_type: lokr"):
        check_file_type(TrainConfig(network_type="lora"), lokr, "x.safetensors")
    check_file_type(TrainConfig(network_type="lokr"), lokr, "x.safetensors")
    plain = _network(base, LoHaModule)[0].kohya_state_dict()
    with pytest.raises(UserError, match="network_type: loha"):
        check_file_type(TrainConfig(network_type="dora"), plain, "x.safetensors")
    with pytest.raises(UserError, match="Tucker"):
        file_network_type({"lora_unet_x.hada_t1": torch.zeros(1), **plain})


# --- config and metadata -------------------------------------------------------------------------------
def test_config_knobs_and_their_refusals():
    cfg = TrainConfig.from_dict({"algo": "lokr", "factor": 8, "decompose_both": True})
    assert (cfg.network_type, cfg.lokr_factor, cfg.decompose_both) == ("lokr", 8, True)
    assert TrainConfig.from_dict({"network_type": "locon"}).target_modules == "locon"
    assert TrainConfig.from_dict({"network_type": "locon", "target_modules": "attention"}).target_modules == "attention"
    with pytest.raises(ConfigError, match="lora_dropout"):
        TrainConfig.from_dict({"network_type": "loha", "lora_dropout": 0.1})
    with pytest.raises(ConfigError, match="use_tucker"):
        TrainConfig.from_dict({"network_type": "lokr", "use_tucker": True})
    with pytest.raises(ConfigError, match="lokr_factor"):
        TrainConfig.from_dict({"network_type": "lokr", "factor": 0})
    with pytest.raises(ConfigError, match="allowed"):
        TrainConfig.from_dict({"network_type": "ia3"})


def test_metadata_names_the_lycoris_module_and_args():
    assert network_metadata(TrainConfig(), {}) == ("networks.lora", {})
    module, args = network_metadata(TrainConfig(network_type="lokr", lokr_factor=8), {})
    assert module == "lycoris.kohya" and args["algo"] == "lokr" and args["factor"] == "8"
    module, args = network_metadata(TrainConfig(network_type="dora", target_modules="locon"), {"conv_dim": "8"})
    assert args == {"algo": "locon", "conv_dim": "8", "dora_wd": "True", "wd_on_output": "False", "use_tucker": "False"}


def test_kohya_lycoris_network_args_map_onto_the_config():
    keys, notes = from_lycoris_args({"algo": "lokr", "factor": "8", "decompose_both": "True", "preset": "attn-mlp"},
                                    "cfg.toml")
    assert keys == {"network_type": "lokr", "lokr_factor": "8", "decompose_both": True, "target_modules": "kohya"}
    keys, notes = from_lycoris_args({"algo": "locon", "dora_wd": "true", "conv_dim": "4"}, "cfg.toml", network_alpha=8)
    assert keys == {"network_type": "dora", "target_modules": "locon", "conv_rank": "4", "conv_alpha": 8}
    keys, notes = from_lycoris_args({"algo": "loha"}, "cfg.toml", network_alpha=1)
    assert keys["network_type"] == "loha" and keys["target_modules"] == "locon" and "conv_in" in notes[0]
    TrainConfig.from_dict(keys)  # what the mapping gives is a valid config
    with pytest.raises(ConfigError, match="rank_dropout"):
        from_lycoris_args({"algo": "lokr", "rank_dropout": "0.1"}, "cfg.toml")
    with pytest.raises(ConfigError, match="dora_wd"):
        from_lycoris_args({"algo": "lokr", "dora_wd": "True"}, "cfg.toml")
    with pytest.raises(ConfigError, match="ia3"):
        from_lycoris_args({"algo": "ia3"}, "cfg.toml")
