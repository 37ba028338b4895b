"""The loss curve as an image, drawn with Pillow alone: the ComfyUI node's IMAGE output, the A1111
tab's live chart and the CLI's loss.png.

Raw per-step loss in light blue, its exponential moving average in dark blue (diffusion losses are
noisy: the trend is what tells over- or under-training), the validation loss (engine/validation.py) as
green points joined by a line on the same scale, the learning rate in orange on its own scale.
"""

from __future__ import annotations

import math

W, H = 768, 384
LEFT, RIGHT, TOP, BOTTOM = 64, 64, 28, 40


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.2e}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.3f}"


def loss_plot(losses: list[float], lrs: list[float] | None = None, title: str = "LoRA training loss",
              first_step: int = 1, validation: list[tuple[int, float]] | None = None):
    """A PIL image of the run's losses (one per optimizer step from `first_step`), learning rates and
    validation losses ((step, loss) pairs)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = LEFT, W - RIGHT, TOP, H - BOTTOM
    d.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    d.text((x0, 6), title, fill="black")
    values = [v for v in losses if v is not None and math.isfinite(v)]
    if not values:
        d.text((x0 + 10, (y0 + y1) // 2), "no steps were trained", fill="black")
        return img
    n = len(values)
    checked = [(s, v) for s, v in (validation or []) if v is not None and math.isfinite(v)]
    lo, hi = min(values + [v for _, v in checked]), max(values + [v for _, v in checked])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

    def xy(i: int, v: float, a: float, b: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (i / max(n - 1, 1))
        return x, y1 - (y1 - y0) * (v - a) / (b - a)

    for k in range(5):  # grid and loss axis labels
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v, lo, hi)
        d.line([x0, y, x1, y], fill=(235, 235, 235))
        d.text((4, y - 6), _fmt(v), fill=(40, 40, 160))
    d.text((x0, y1 + 6), f"step {first_step}", fill="black")
    d.text((x1 - 50, y1 + 6), f"step {first_step + n - 1}", fill="black")
    if n == 1:
        x, y = xy(0, values[0], lo, hi)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 60, 200))
    else:
        d.line([xy(i, v, lo, hi) for i, v in enumerate(values)], fill=(160, 190, 240), width=1)
        d.line([xy(i, v, lo, hi) for i, v in enumerate(ema(values))], fill=(30, 60, 200), width=2)
    if checked:
        points = [xy(s - first_step, v, lo, hi) for s, v in checked]
        if len(points) > 1:
            d.line(points, fill=(20, 150, 60), width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 150, 60))
        d.text((x0 + 420, 6), f"validation {_fmt(checked[-1][1])}", fill=(20, 150, 60))
    if lrs:
        lr = [v for v in lrs[:n] if v is not None]
        if lr:
            top = max(lr) or 1.0
            pts = [xy(i, v, 0.0, top * 1.05) for i, v in enumerate(lr)]
            if len(pts) > 1:
                d.line(pts, fill=(240, 140, 20), width=1)
            d.text((x1 + 4, y0), _fmt(top), fill=(200, 110, 10))
            d.text((x1 + 4, y1 - 12), "lr", fill=(200, 110, 10))
    d.text((x0 + 120, 6), f"last {_fmt(values[-1])}  smoothed {_fmt(ema(values)[-1])}", fill=(30, 60, 200))
    return img

