"""The stall watchdog (engine/watchdog.py) with a fake clock: what a stalled step reports."""

from __future__ import annotations

from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.options import EngineOptions
from engine.train import train
from engine.watchdog import StallWatchdog
from tests.engine.train_fixtures import pattern_dataset, quick_config


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(dog, clock, durations, data=()):
    out = []
    for i, d in enumerate(durations, 1):
        dog.start()
        with dog.loading():
            clock.now += data[i - 1] if i - 1 < len(data) else 0.0
        clock.now += d
        out.append(dog.end(i))
    return out


def test_a_data_stall_and_a_device_stall_are_told_apart():
    clock, said = FakeClock(), []
    dog = StallWatchdog(said.append, clock=clock)
    reports = _steps(dog, clock, [60, 1, 1, 1, 1, 1, 0.5, 2], data=[0, 0, 0, 0, 0, 0, 45, 0])
    assert reports[:6] == [None] * 6  # the first (slow: capture/compile) step is warm-up, not a stall
    assert reports[6] == ("step 7 took 46 s, 46x the usual 1.0 s: it waited 45 s for its images (the data loader: "
                          "a slow or network drive, a very large or broken image, or the CPU busy elsewhere)")
    assert _steps(dog, clock, [40])[0].startswith("step 1 took 40 s, 40x the usual 1.0 s: the device took 40 s "
                                                  "(GPU memory spilling into shared system memory")
    assert said == dog.reports and len(said) == 2


def test_slow_but_not_stalled_steps_are_not_reported():
    clock = FakeClock()
    dog = StallWatchdog(lambda m: None, clock=clock)
    assert _steps(dog, clock, [5, 5, 5, 5, 5, 29, 45]) == [None] * 7  # 29 s < 30 s; 45 s is 9x, not 10x


def test_a_run_reports_a_stalled_data_loader(tmp_path, monkeypatch):
    """An injected 100 s wait in the data loader at the 6th batch (the fake clock jumps)."""
    import engine.data.train_data as train_data

    clock = FakeClock()
    original = train_data.TrainData.gather
    calls = []

    def gather(self, plan, *, epoch):
        calls.append(1)
        clock.now += 100.0 if len(calls) == 6 else 0.5
        return original(self, plan, epoch=epoch)

    monkeypatch.setattr(train_data.TrainData, "gather", gather)
    infos = []
    cfg = quick_config(pattern_dataset(tmp_path / "data"), tmp_path / "out", max_train_steps=8, batch_size=1)
    result = train(cfg, tiny_sd1(seed=3), options=EngineOptions(clock=clock),
                   callbacks=[FunctionCallback(lambda e: infos.append(e.message) if e.kind == "info" else None)])
    assert result.steps == 8
    stalls = [m for m in infos if " took " in m]
    assert stalls == ["step 6 took 100 s, 200x the usual 0.5 s: it waited 100 s for its images (the data loader: "
                      "a slow or network drive, a very large or broken image, or the CPU busy elsewhere)"]
