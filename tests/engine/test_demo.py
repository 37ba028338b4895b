"""The demo a new user runs first: the built-in model draws what it is asked, and the demo's LoRA visibly
changes the pictures (solid shapes at strength 0, striped ones with the LoRA)."""

import numpy as np
import pytest
from PIL import Image

from engine.__main__ import main
from engine.demo import DEMO_PROMPTS, LABEL_HEIGHT, LABEL_WIDTH, SCALE, STRENGTHS, stripiness
from engine.errors import ModelError
from engine.models.demo_model import demo_model

CELL = 64 * SCALE


@pytest.fixture(scope="module")
def model():
    return demo_model()


def _regions(image):
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    centre = a[h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8].reshape(-1, 3).mean(0)
    corners = np.concatenate([a[:6, :6], a[:6, -6:], a[-6:, :6], a[-6:, -6:]]).reshape(-1, 3).mean(0)
    return centre, corners


@pytest.mark.parametrize("seed", [1, 2])
def test_demo_model_draws_the_colours_it_is_asked_for(model, seed):
    """A random-weight model gives noise here; the shipped model gives a red disc on white and a blue
    square on black, whatever the seed."""
    red, blue = model.sample(["a red circle on a white background", "a blue square on a black background"],
                             seed=seed, steps=20, cfg=5.0, width=64, height=64)
    (r, g, b), white = _regions(red)
    assert r > 150 and r - g > 80 and r - b > 80, f"centre of 'a red circle' is {r:.0f},{g:.0f},{b:.0f}"
    assert white.min() > 200, f"corners of 'on a white background' are {white.round()}"
    (r, g, b), black = _regions(blue)
    assert b > 150 and b - r > 80 and b - g > 60, f"centre of 'a blue square' is {r:.0f},{g:.0f},{b:.0f}"
    assert black.max() < 70, f"corners of 'on a black background' are {black.round()}"


def test_missing_demo_model_file_says_how_to_restore_it(tmp_path):
    with pytest.raises(ModelError, match="demo_build"):
        demo_model(tmp_path / "gone.safetensors")


def test_demo_trains_a_lora_that_visibly_changes_the_pictures(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "演示 out")]) == 0  # the default run a user makes
    root = tmp_path / "演示 out" / "demo"
    assert (root / "demo_lora" / "demo_lora.safetensors").is_file()
    assert "demo_grid.png" in capsys.readouterr().out
    grid = np.asarray(Image.open(root / "demo_grid.png").convert("RGB"), dtype=np.float32)
    assert grid.shape == (LABEL_HEIGHT + CELL * len(DEMO_PROMPTS), LABEL_WIDTH + CELL * len(STRENGTHS), 3)

    def cell(row, col):
        y, x = LABEL_HEIGHT + row * CELL, LABEL_WIDTH + col * CELL
        return grid[y:y + CELL, x:x + CELL]

    base, lora = STRENGTHS.index(0.0), STRENGTHS.index(1.0)
    diff = np.mean([np.abs(cell(r, base) - cell(r, lora)).mean() for r in range(len(DEMO_PROMPTS))])
    assert diff > DIFF_THRESHOLD, f"strength 0 and 1 differ by only {diff:.1f} (0-255) on average"
    stripes = [(round(stripiness(cell(r, base)), 1), round(stripiness(cell(r, lora)), 1))
               for r in range(len(DEMO_PROMPTS))]
    assert sum(with_lora > 2 * without for without, with_lora in stripes) >= 2, \
        f"the LoRA column should show stripes the base column lacks (stripiness base, LoRA per row: {stripes})"


DIFF_THRESHOLD = 20.0
