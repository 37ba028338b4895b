"""The live loss chart as a PIL image: identical on Gradio 3 (A1111) and Gradio 4 (Forge), no plotting
library needed. Raw losses are drawn faint, an exponential moving average on top."""

from __future__ import annotations

import math


def smooth(values: list[float], factor: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else factor * avg + (1 - factor) * v
        out.append(avg)
    return out


def render_loss_plot(losses: list[tuple[int, float]], width: int = 560, height: int = 220):
    """A chart of (step, loss) pairs; None until there are two finite points."""
    from PIL import Image, ImageDraw

    points = [(int(s), float(v)) for s, v in losses if math.isfinite(float(v))]
    if len(points) < 2:
        return None
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 52, width - 10, 10, height - 24
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (right - left)
        y = bottom - (value - lo) / (hi - lo) * (bottom - top)
        return x, y

    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        _, y = xy(s0, value)
        draw.line([left, y, right, y], fill=(235, 235, 235))
        draw.text((4, y - 6), f"{value:.4f}", fill=(90, 90, 90))
    draw.text((left, bottom + 6), f"step {s0}", fill=(90, 90, 90))
    draw.text((right - 70, bottom + 6), f"step {s1}", fill=(90, 90, 90))
    draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
    draw.line([xy(s, v) for s, v in zip(steps, smooth(values))], fill=(30, 80, 200), width=2)
    return image
