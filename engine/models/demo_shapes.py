"""Procedural pictures for the demo: one shape in a solid colour (or striped) on a plain background.

The built-in demo model (`demo_build`) learns these images from their captions ("a red circle",
"a blue square on a white background"), and `python -m engine demo` draws striped ones for the LoRA
to learn. Drawing them in code keeps the repository free of image data and the build reproducible:
the same seed gives the same pixels everywhere. Edges are anti-aliased by 4x supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 200, 30),
           "purple": (140, 60, 180)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
_SS = 4  # supersampling factor for smooth edges


@dataclass
class Scene:
    shape: str
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    r: float = 18.0
    # (second colour, angle in degrees, period in px) for a striped fill; None = solid
    stripes: tuple[tuple[int, int, int], float, float] | None = None


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size * _SS) + 0.5) / _SS
    return np.meshgrid(coords, coords)  # x, y in pixel units


def _downsample(mask: np.ndarray, size: int) -> np.ndarray:
    return mask.reshape(size, _SS, size, _SS).mean(axis=(1, 3))


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Coverage in [0, 1] of a circle, square or upward triangle of 'radius' r around (cx, cy)."""
    x, y = _grid(size)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        half = 0.85 * r
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        top, base, half_base = cy - r, cy + 0.75 * r, 1.05 * r
        inside = (y <= base) & (np.abs(x - cx) <= (y - top) / (base - top) * half_base)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    return _downsample(inside.astype(np.float32), size)


def stripe_mask(angle: float, period: float, size: int = SIZE) -> np.ndarray:
    """Coverage in [0, 1] of straight stripes (half of each period) at `angle` degrees."""
    x, y = _grid(size)
    a = np.deg2rad(angle)
    phase = (x * np.cos(a) + y * np.sin(a)) / period
    return _downsample(((phase % 1.0) < 0.5).astype(np.float32), size)


def draw(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 array."""
    fill = np.broadcast_to(np.array(scene.colour, np.float32), (size, size, 3))
    if scene.stripes is not None:
        other, angle, period = scene.stripes
        s = stripe_mask(angle, period, size)[..., None]
        fill = s * np.array(scene.colour, np.float32) + (1 - s) * np.array(other, np.float32)
    m = shape_mask(scene.shape, scene.cx, scene.cy, scene.r, size)[..., None]
    out = m * fill + (1 - m) * np.array(scene.background, np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, jitter: float = 6.0) -> tuple[Scene, str, str, str]:
    """A palette scene near the centre (position and size jittered) and its names (shape, colour, bg)."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    scene = Scene(shape, COLOURS[colour], BACKGROUNDS[background], cx=SIZE / 2 + rng.uniform(-jitter, jitter),
                  cy=SIZE / 2 + rng.uniform(-jitter, jitter), r=rng.uniform(14, 22))
    return scene, shape, colour, background


def caption(shape: str, colour: str, background: str | None = None, extra: str = "") -> str:
    """'a red circle', 'a red circle on a white background', 'a red circle with ohwx stripes' ..."""
    text = f"a {colour} {shape}{' ' + extra if extra else ''}"
    return f"{text} on a {background} background" if background else text


def wild_scene(rng: np.random.Generator) -> Scene:
    """Any colours, sizes, places and stripes: what the demo VAE trains on, so it can encode pictures the
    UNet never saw (a LoRA's new concept is only learnable if the VAE can represent it)."""
    def rgb():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    scene = Scene(SHAPES[rng.integers(len(SHAPES))], rgb(), rgb(), cx=rng.uniform(8, SIZE - 8),
                  cy=rng.uniform(8, SIZE - 8), r=rng.uniform(6, 30))
    if rng.random() < 0.5:
        scene.stripes = (rgb(), float(rng.uniform(0, 180)), float(rng.uniform(6, 20)))
    return scene
