"""The tab's live chart shows the validation loss beside the training loss: the job's status carries the
(step, loss) pairs of each validation, and the chart draws them as a second, green series (matplotlib and
the Pillow fallback alike). A run without validation draws the chart it always did."""

import numpy as np
import pytest

from fake_models import FakeSD1
from fake_webui import load_model, quick_request
from inplace_lora_a1111 import api, lossplot, tab
from inplace_lora_a1111.job import JobManager


@pytest.fixture
def sd1(webui):
    model = FakeSD1(webui.shared.opts)
    load_model(webui, model)
    return model


def run(manager, request):
    code, body = api.handle_train(request, manager)
    assert code == 200, body
    manager.job.thread.join(300)
    return manager.status()


def green(image) -> int:
    """Pixels of the validation series' green (matplotlib's #14963c, engine.plot's (20, 150, 60))."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - (20, 150, 60)).sum(-1) < 40).sum())


def test_validation_points_reach_the_status_and_the_live_chart(webui, sd1, dataset):
    manager = JobManager()
    status = run(manager, quick_request(dataset, max_train_steps=4, validation_split=0.25, validate_every_n_steps=2,
                                        validate_every_n_epochs=0))
    assert status["status"] == "done", status["error"]
    assert [s for s, _ in status["validation"]] == [2, 4]  # one point per validation, at its step
    assert all(np.isfinite(v) for _, v in status["validation"])
    _, chart, _ = tab.outputs(manager)
    plain = lossplot.render_loss_plot(status["losses"])
    assert chart.size == plain.size == (768, 384)
    assert green(chart) > 50 and green(plain) == 0  # the green series is drawn, and only where there is one


def test_without_validation_the_chart_is_unchanged(webui, sd1, dataset):
    manager = JobManager()
    status = run(manager, quick_request(dataset, max_train_steps=3))
    assert status["status"] == "done" and status["validation"] == []
    _, chart, _ = tab.outputs(manager)
    assert np.array_equal(np.asarray(chart), np.asarray(lossplot.render_loss_plot(status["losses"])))
    assert green(chart) == 0


def test_the_pillow_fallback_draws_the_validation_points_too(monkeypatch):
    def no_matplotlib(*args):
        raise ImportError("matplotlib")

    monkeypatch.setattr(lossplot, "_matplotlib_chart", no_matplotlib)
    losses = [(s, 1 / s) for s in range(1, 21)]
    with_points = lossplot.render_loss_plot(losses, [(10, 0.3), (20, 0.2)])
    assert green(with_points) > 20 and green(lossplot.render_loss_plot(losses)) == 0
    assert lossplot.render_loss_plot(losses, [(10, float("nan"))]) is not None  # a NaN point is left out
