"""Resume state as safetensors + JSON: every optimizer's state, every schedule, every RNG and the
GradScaler come back exactly, with no unpickler involved; state.pt files of earlier versions load
through torch's weights_only loader or fail with a message that says what to do."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import SCHEDULERS, TrainConfig
from engine.errors import UserError
from engine.optim import Lion, build_optimizer, build_scheduler, param_groups
from engine.resume_state import JSON_FILE, TENSORS_FILE, load_state, save_state


def _params():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4, 8), (8, 4, 3, 3), (8,)]  # LoRA down/up, a conv down, a bias-like vector
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _optimizer(name, params):
    lr = 1.0 if name == "Prodigy" else 1e-3  # Prodigy: one lr for all groups
    cfg = TrainConfig(optimizer=name, learning_rate=lr, text_encoder_lr=lr)
    return build_optimizer(cfg, param_groups(cfg, params[:3], params[3:]), torch.device("cpu"))


def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resume state must load without an unpickler")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                        (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)


def _assert_same(a, b, path="state"):
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", ["AdamW", "Lion", "Adafactor", "Prodigy"])
def test_every_optimizer_continues_bit_for_bit(name, tmp_path, monkeypatch):
    params = _params()
    opt = _optimizer(name, params)
    for seed in (1, 2):
        _grads(params, seed)
        opt.step()
    save_state(tmp_path, {"optimizer": opt.state_dict()})
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with monkeypatch.context() as m:
        _no_unpickling(m)
        saved = load_state(tmp_path)["optimizer"]
    _assert_same(opt.state_dict(), saved)
    resumed = _optimizer(name, copies)
    resumed.load_state_dict(saved)
    for seed in (3, 4):  # the next steps are the same steps
        _grads(params, seed)
        _grads(copies, seed)
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_adamw8bit_state_shapes_round_trip(tmp_path):
    """bitsandbytes' 8-bit AdamW keeps uint8 moments, per-block float absmax and one quantization map
    shared by every parameter (CUDA only, so its state is built here with the same keys and shapes)."""
    qmap1 = torch.linspace(-1, 1, 256)
    qmap2 = torch.linspace(0, 1, 256)
    state = {}
    for i, n in enumerate((5000, 300)):
        blocks = -(-n // 256)
        if n >= 4096:  # bitsandbytes keeps small tensors' moments in fp32
            state[i] = {"step": 7, "state1": torch.randint(0, 255, (n,), dtype=torch.uint8), "qmap1": qmap1,
                        "state2": torch.randint(0, 255, (n,), dtype=torch.uint8), "qmap2": qmap2,
                        "absmax1": torch.rand(blocks), "absmax2": torch.rand(blocks), "unorm_vec": torch.zeros(1)}
        else:
            state[i] = {"step": 7, "state1": torch.randn(n), "state2": torch.rand(n)}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "optim_bits": 32,
               "min_8bit_size": 4096, "percentile_clipping": 100, "block_wise": True, "max_unorm": 0.0,
               "skip_zeros": False, "is_paged": False, "alpha": 0.0, "t_alpha": None, "params": [0, 1]}]
    optimizer = {"state": state, "param_groups": groups}
    save_state(tmp_path, {"optimizer": optimizer})
    loaded = load_state(tmp_path)["optimizer"]
    _assert_same(optimizer, loaded)
    assert loaded["state"][0]["qmap1"] is loaded["state"][0]["qmap1"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / TENSORS_FILE), "pt") as fh:
        assert sum("qmap1" in k for k in fh.keys()) == 1  # the shared map is stored once


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_continues(name, tmp_path):
    cfg = TrainConfig(lr_scheduler=name, warmup_steps=3)
    params = _params()

    def build():
        opt = build_optimizer(cfg, param_groups(cfg, params, []), torch.device("cpu"))
        return opt, build_scheduler(cfg, opt, 20)

    opt, sched = build()
    for _ in range(7):
        opt.step()
        sched.step()
    save_state(tmp_path, {"scheduler": sched.state_dict()})  # no tensors at all
    from safetensors import safe_open

    with safe_open(str(tmp_path / TENSORS_FILE), "pt") as fh:
        assert fh.metadata() is None  # safetensors 0.4.2 (A1111's) cannot read metadata without tensors
    opt2, sched2 = build()
    sched2.load_state_dict(load_state(tmp_path)["scheduler"])
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_and_scaler_come_back_exactly(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(3), torch.rand(2), torch.rand(2, generator=generator)
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 17}
    save_state(tmp_path, {"rng": [ckpt.rng_state(generator)], "scaler": scaler, "step": 5, "micro": 10,
                          "odd": {"inf": float("inf"), "nan": float("nan"), "tiny": 5e-324, "__tuple__": 1}})
    want = (random.random(), np.random.randn(3), torch.rand(2), torch.rand(2, generator=generator))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    other = torch.Generator().manual_seed(9)
    with monkeypatch.context() as m:
        _no_unpickling(m)
        state = load_state(tmp_path)
    ckpt.restore_rng(state["rng"][0], other)
    got = (random.random(), np.random.randn(3), torch.rand(2), torch.rand(2, generator=other))
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert state["scaler"] == scaler and (state["step"], state["micro"]) == (5, 10)
    assert state["odd"]["inf"] == float("inf") and state["odd"]["nan"] != state["odd"]["nan"]
    assert state["odd"]["tiny"] == 5e-324 and state["odd"]["__tuple__"] == 1
    text = json.loads((tmp_path / JSON_FILE).read_text(encoding="utf-8"))
    assert text["state"]["step"] == 5  # readable without the trainer


def test_unstorable_values_are_named(tmp_path):
    with pytest.raises(TypeError, match="'optimizer/hook' holds a function"):
        save_state(tmp_path, {"optimizer": {"hook": lambda: None}})


# --- checkpoints of earlier versions (state.pt, a pickle) ----------------------------------------------

def _legacy_checkpoint(folder, **extra):
    """What versions before the safetensors + JSON state wrote: torch.save of the whole state."""
    params = _params()
    opt = Lion(params, lr=1e-4)
    _grads(params, 1)
    opt.step()
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / ckpt.WEIGHTS_FILE))
    state = {"optimizer": opt.state_dict(), "scheduler": {"last_epoch": 3}, "scaler": None, "step": 3, "micro": 6,
             "rng": [ckpt.rng_state(torch.Generator())], "fingerprint": ckpt.fingerprint(TrainConfig().to_dict()),
             "lora_file": "x-step00000003.safetensors", **extra}
    torch.save(state, folder / ckpt.LEGACY_STATE_FILE)
    return state


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5 cannot allow numpy "
                    "arrays in weights_only loads (the refusal is tested below)")
def test_an_earlier_versions_state_pt_still_resumes(tmp_path):
    folder = tmp_path / "checkpoints" / "step-00000003"
    written = _legacy_checkpoint(folder)
    assert ckpt.checkpoint_dirs(tmp_path / "checkpoints") == [folder]
    assert ckpt.resolve("latest", tmp_path / "checkpoints") == folder
    _, state = ckpt.load_checkpoint(folder, TrainConfig().to_dict())
    assert state["step"] == 3
    _assert_same(written["optimizer"], state["optimizer"])
    assert np.array_equal(state["rng"][0]["numpy"][1], written["rng"][0]["numpy"][1])


def test_a_refused_state_pt_gets_advice_not_a_type_error(tmp_path, monkeypatch):
    folder = tmp_path / "step-00000003"
    _legacy_checkpoint(folder)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # A1111's safe loading returns None when it refuses
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(folder, TrainConfig().to_dict())
    message = str(info.value)
    assert "earlier version" in message and "refused" in message
    assert f"network_weights {folder / ckpt.WEIGHTS_FILE}" in message


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_a_state_pt_is_never_fully_unpickled(tmp_path, capsys):
    folder = tmp_path / "step-00000003"
    _legacy_checkpoint(folder, payload=_Payload())
    with pytest.raises(UserError, match="cannot be read safely"):
        ckpt.load_checkpoint(folder, TrainConfig().to_dict())
    assert "a pickle ran code" not in capsys.readouterr().out


def test_damaged_state_says_what_to_do(tmp_path):
    folder = tmp_path / "step-00000004"
    folder.mkdir()
    save_state(folder, {"step": 4})
    (folder / JSON_FILE).write_text('{"format": "inplace-lora-trainer resume state", "vers', encoding="utf-8")
    with pytest.raises(UserError, match="older step-\\* folder"):
        ckpt.read_state(folder)


def test_inspect_reads_a_checkpoint_folder(tmp_path, capsys):
    from engine.inspect_cli import inspect_main

    folder = tmp_path / "step-00000003"
    folder.mkdir()
    save_state(folder, {"step": 3, "micro": 6, "lora_file": "x-step00000003.safetensors",
                        "fingerprint": {"lora_rank": 4}})
    assert inspect_main([str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint at step 3 (next micro-batch 6), LoRA x-step00000003.safetensors" in printed
