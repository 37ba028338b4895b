"""The fast training step trains exactly like the plain one.

On a GPU the fast step is a CUDA graph; here on the CPU it runs the same static-buffer step without
the graph (`EngineOptions(fast_step_without_graph=True)`: `FastStep(capture=False)`), which is everything the graph replays: the shared loss,
gradients created in backward and dropped after the step, foreach clipping, the learning rate in a tensor the scheduler fills, and the per-step
LoRA weight casts. Losses and final weights are bit-identical (fp32 on the CPU; the learning rate's
tensor is float64 there, so AdamW's scalar arithmetic is the plain step's: FastStep._tensor_lr).
"""

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.fast_step import FastStep, host_lrs
from engine.models import tiny_sd1, tiny_sdxl
from engine.train import train

from train_fixtures import FAST_ON_CPU, pattern_dataset, quick_config

RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("fast"), n=4)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= RTOL * max(abs(x), abs(y), 1e-8) for x, y in zip(a, b))


@pytest.mark.parametrize("family,gc", [("sd1", False), ("sd1", True), ("sdxl", False)])
def test_fast_step_gives_the_plain_loss_curve(data, tmp_path, family, gc):
    build = tiny_sd1 if family == "sd1" else tiny_sdxl
    opts = dict(max_train_steps=5, batch_size=2, gradient_checkpointing=gc, lr_scheduler="cosine",
                warmup_steps=2, max_grad_norm=0.05, noise_offset=0.05, device="cpu")  # bit for bit: the CPU's
    plain = train(quick_config(data, tmp_path / "plain", **opts), build())
    fast = train(quick_config(data, tmp_path / "fast", **opts), build(), options=FAST_ON_CPU)
    assert plain.fast_steps == 0 and fast.fast_steps == 5, "the fast step was not used"
    assert plain.losses == fast.losses
    assert plain.tensors.keys() == fast.tensors.keys()
    for key, value in plain.tensors.items():
        assert torch.equal(value, fast.tensors[key]), key
    moved = [v for k, v in fast.tensors.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in moved)  # it trained: the up weights left zero


def test_fast_checkpoint_resumes_on_the_plain_step(data, tmp_path):
    """A checkpoint written by the fast step is what the plain step writes (float lr), and a run resumed
    from it on the plain step ends where an uninterrupted fast run ends."""
    opts = dict(max_train_steps=4, lr_scheduler="linear", warmup_steps=1)
    straight = train(quick_config(data, tmp_path / "a", save_steps=2, **opts), tiny_sd1(), options=FAST_ON_CPU)
    folder = tmp_path / "a" / "test_lora" / "checkpoints" / "step-00000002"
    _, state = load_checkpoint(folder, quick_config(data, tmp_path / "a", save_steps=2, **opts).to_dict())
    groups = state["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g.get("capturable") for g in groups)
    assert straight.fast_steps == 4, "the first run did not take the fast step"
    import shutil

    shutil.copytree(folder, tmp_path / "b" / "test_lora" / "checkpoints" / folder.name)
    resumed = train(quick_config(data, tmp_path / "b", resume_from_checkpoint="latest", **opts), tiny_sd1())
    assert resumed.fast_steps == 0
    assert _close(straight.losses[2:], resumed.losses)


def test_scheduler_keeps_filling_the_lr_tensor():
    """The graphs read the lr from a tensor: every schedule step must land in that same tensor."""
    from engine.config import TrainConfig
    from engine.optim import build_optimizer, build_scheduler, param_groups

    cfg = TrainConfig(lr_scheduler="cosine", warmup_steps=2, learning_rate=1.0)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(cfg, param_groups(cfg, [p], []), torch.device("cpu"))
    sched = build_scheduler(cfg, opt, 10)
    expected = []
    for _ in range(6):
        expected.append(host_lrs(sched, opt)[0])
        opt.step()  # no gradients, so nothing moves; the scheduler checks that a step came first
        sched.step()

    step = type("Step", (), {"device": torch.device("cpu"), "network": type("N", (), {"loras": {}})()})()
    opt2 = build_optimizer(cfg, param_groups(cfg, [p], []), torch.device("cpu"))
    fast = FastStep(step, optimizer=opt2, scheduler=build_scheduler(cfg, opt2, 10), params=[p], max_grad_norm=0,
                    capture=False)
    tensor = opt2.param_groups[0]["lr"]
    seen = []
    for _ in range(6):
        seen.append(float(tensor))
        assert fast.lr() == pytest.approx(seen[-1])
        opt2.step()
        fast.scheduler_step()
        assert opt2.param_groups[0]["lr"] is tensor
    assert seen == pytest.approx(expected)
    fast.close()
    assert isinstance(opt2.param_groups[0]["lr"], float)


def test_no_gradients_are_held_between_steps(data, tmp_path, monkeypatch):
    """Gradients live from backward to the optimizer step only: nothing keeps them between steps (on the
    GPU that keeps a full set of them out of the next step's peak, mid-backward)."""
    held = []
    original = FastStep.step

    def step(self, batch):
        loss = original(self, batch)
        held.append([p.grad is not None for p in self.params])
        return loss

    monkeypatch.setattr(FastStep, "step", step)
    result = train(quick_config(data, tmp_path, max_train_steps=3), tiny_sd1(), options=FAST_ON_CPU)
    assert result.fast_steps == 3 and len(held) == 3
    assert not any(any(flags) for flags in held)


def test_shapes_past_the_graph_limit_train_eagerly_and_the_user_hears_it_once(monkeypatch):
    """A run with more bucket shapes than `MAX_GRAPHS` graphs the first ones and trains the others without
    a graph; that is slower, so the run's status line says so, once (here with the limit at 1 and a stand-in
    capture: the CPU has no CUDA graphs)."""
    import engine.fast_step as fast_step

    monkeypatch.setattr(fast_step, "MAX_GRAPHS", 1)
    said, captured, eager = [], [], []
    step = type("Step", (), {"device": torch.device("cpu"), "network": type("N", (), {"loras": {}})()})()
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    fast = FastStep(step, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), params=[p],
                    max_grad_norm=0, capture=True, say=said.append)

    def capture(inp):
        captured.append(fast._key(inp))
        graph = type("G", (), {"replay": lambda self: None})()
        return fast_step._Graph(graph, inp, torch.zeros(()))

    monkeypatch.setattr(fast, "_capture", capture)
    monkeypatch.setattr(fast, "_eager", lambda inp: eager.append(fast._key(inp)) or torch.zeros(()))
    monkeypatch.setattr(fast, "step_fn", type("S", (), {
        "draw": lambda self, batch: None,
        "tensors": lambda self, batch, draws: {"x": torch.zeros(batch.side)}})())
    batch = lambda side: type("B", (), {"cond": object(), "side": side})()  # noqa: E731
    for side in (4, 4, 4, 6, 6, 6, 8, 8):
        fast.step(batch(side))
    assert len(captured) == 1 and len(fast.graphs) == 1  # the first shape only
    assert len(eager) == 1 + 3 + 2  # its warm-up, then every step of the shapes past the limit
    assert len(said) == 1 and "more than 1 input shapes" in said[0] and "bucket_reso_steps" in said[0]
    fast.close()
