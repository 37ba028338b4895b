"""The tab's live loss chart as a PIL image (the same on Gradio 3 and 4).

Drawn with matplotlib where the WebUI has it (A1111's requirements bring it): real fonts, a title,
labelled axes. Without it, engine.plot's Pillow chart, the one the ComfyUI node shows, at its own
size: scaling it down would squash its bitmap text. The component shows no label of its own, so
nothing covers the title.
"""

from __future__ import annotations

import math

TITLE = "Loss per step"
SIZE = (768, 384)


def render_loss_plot(losses: list[tuple[int, float]]):
    """A chart of (step, loss) pairs; None until there are two finite points."""
    points = [(int(s), float(v)) for s, v in losses if math.isfinite(float(v))]
    if len(points) < 2:
        return None
    try:
        return _matplotlib_chart([s for s, _ in points], [v for _, v in points])
    except ImportError:
        from engine.plot import loss_plot

        return loss_plot([v for _, v in points], title=TITLE, first_step=points[0][0])


def _matplotlib_chart(steps: list[int], values: list[float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, safe from the training thread
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    from engine.plot import ema

    fig = Figure(figsize=(SIZE[0] / 100, SIZE[1] / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="#a0bef0", linewidth=1, label="loss")
    ax.plot(steps, ema(values), color="#1e3cc8", linewidth=2, label="smoothed")
    ax.set_title(f"{TITLE} (last {values[-1]:.4f})")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also with few points
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
