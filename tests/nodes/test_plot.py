"""The loss IMAGE output: a real curve for a run, and no crash for the runs that have nothing to draw."""
import math

import numpy as np

from inplace_lora_pack.nodes.plot import ema, loss_plot, pil_to_image_tensor


def test_curve_depends_on_the_losses_and_converts_to_a_comfy_image():
    a = np.asarray(loss_plot([1.0, 0.8, 0.6, 0.5], [1e-4] * 4))
    b = np.asarray(loss_plot([0.5, 0.6, 0.8, 1.0], [1e-4] * 4))
    assert a.shape == (384, 768, 3) and not np.array_equal(a, b)
    tensor = pil_to_image_tensor(loss_plot([1.0, 0.5]))
    assert tuple(tensor.shape) == (1, 384, 768, 3) and 0 <= float(tensor.min()) and float(tensor.max()) <= 1


def test_empty_single_and_non_finite_runs_still_draw():
    for losses in ([], [0.3], [math.nan, 0.2, math.inf, 0.1]):
        assert loss_plot(losses).size == (768, 384)


def test_ema_smooths_towards_the_recent_values():
    smoothed = ema([1.0] * 5 + [0.0] * 5)
    assert smoothed[0] == 1.0 and 0 < smoothed[-1] < 1.0
