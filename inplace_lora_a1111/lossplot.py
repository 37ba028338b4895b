"""The tab's live loss chart: engine.plot's chart as a PIL image, identical on Gradio 3 (A1111) and
Gradio 4 (Forge), no plotting library needed."""

from __future__ import annotations

import math


def render_loss_plot(losses: list[tuple[int, float]], width: int = 560, height: int = 220):
    """A chart of (step, loss) pairs; None until there are two finite points."""
    from engine.plot import loss_plot

    points = [(int(s), float(v)) for s, v in losses if math.isfinite(float(v))]
    if len(points) < 2:
        return None
    return loss_plot([v for _, v in points], first_step=points[0][0]).resize((width, height))
