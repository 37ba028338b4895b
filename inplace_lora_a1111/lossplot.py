"""The tab's live loss chart as a PIL image (the same on Gradio 3 and 4).

Drawn with matplotlib where the WebUI has it (A1111's requirements bring it): real fonts, a title,
labelled axes. Without it, engine.plot's Pillow chart, the one the ComfyUI node shows, at its own
size: scaling it down would squash its bitmap text. The component shows no label of its own, so
nothing covers the title. The validation loss (engine/validation.py), where the run computes one, is
a second series on the same axis: green points at the steps it was measured, joined by a line.
"""

from __future__ import annotations

import math

TITLE = "Loss per step"
SIZE = (768, 384)
VALIDATION_COLOR = "#14963c"  # engine.plot's green


def _finite(pairs) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in pairs or () if v is not None and math.isfinite(float(v))]


def render_loss_plot(losses: list[tuple[int, float]], validation: list[tuple[int, float]] | None = None):
    """A chart of (step, loss) pairs and the (step, validation loss) pairs so far; None until there are
    two finite training-loss points."""
    points, checked = _finite(losses), _finite(validation)
    if len(points) < 2:
        return None
    try:
        return _matplotlib_chart([s for s, _ in points], [v for _, v in points], checked)
    except ImportError:
        from engine.plot import loss_plot

        return loss_plot([v for _, v in points], title=TITLE, first_step=points[0][0], validation=checked)


def _matplotlib_chart(steps: list[int], values: list[float], validation: list[tuple[int, float]] = ()):
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
    title = f"{TITLE} (last {values[-1]:.4f}"
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], color=VALIDATION_COLOR, linewidth=2,
                marker="o", markersize=5, label="validation")
        title += f", validation {validation[-1][1]:.4f}"
    ax.set_title(title + ")")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also with few points
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
