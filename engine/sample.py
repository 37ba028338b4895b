"""Preview images during training, with the prompt syntax kohya users write.

A prompt line may carry options: `a cat --n lowres, blurry --w 512 --h 768 --d 42 --l 7 --s 20 --g 3.5`
(negative prompt, width, height, seed, CFG scale, steps, and for Flux.1 the guidance value). The same
seed every time makes previews comparable across steps. Hosts with their own sampler (ComfyUI) do not
implement `model.sample`, and previews are then left to their nodes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

_OPTION = re.compile(r"\s--(n|w|h|d|l|s|g)\s+")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 0
    height: int = 0
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    guidance: float | None = None


def parse_prompt(line: str) -> SamplePrompt:
    parts = _OPTION.split(" " + line.strip())
    result = SamplePrompt(prompt=parts[0].strip())
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if flag == "n":
                result.negative = value
            elif flag == "w":
                result.width = int(value)
            elif flag == "h":
                result.height = int(value)
            elif flag == "d":
                result.seed = int(value)
            elif flag == "l":
                result.cfg = float(value)
            elif flag == "s":
                result.steps = int(value)
            elif flag == "g":
                result.guidance = float(value)
        except ValueError:
            raise ConfigError(f"sample prompt {line!r}: --{flag} needs a number, got {value!r}.") from None
    return result


def load_prompts(cfg: TrainConfig) -> list[SamplePrompt]:
    lines: list[str] = []
    for item in cfg.sample_prompts:
        path = Path(item).expanduser()
        if item.endswith(".txt") and path.is_file():
            lines += [ln for ln in path.read_text(encoding="utf-8-sig").splitlines()
                      if ln.strip() and not ln.lstrip().startswith("#")]
        else:
            lines.append(item)
    return [parse_prompt(ln) for ln in lines]


def render_previews(model, prompts: list[SamplePrompt], cfg: TrainConfig, default_size: tuple[int, int],
                    trigger_word: str = "") -> list:
    """One image per prompt with the LoRA hooks as attached; [] when the host cannot sample."""
    images = []
    flow = model.info.spec.objective == "flow"  # a flow model (Flux.1) is told its guidance value; CFG is --l or 1
    for i, p in enumerate(prompts):
        text = p.prompt.replace("[trigger]", trigger_word) if trigger_word else p.prompt
        extra = {"guidance": p.guidance if p.guidance is not None else cfg.sample_guidance} if flow else {}
        scale = p.cfg if p.cfg is not None else (1.0 if flow else cfg.sample_cfg)
        with torch.no_grad():
            try:
                out = model.sample([text], seed=p.seed if p.seed is not None else cfg.sample_seed + i,
                                   steps=p.steps or cfg.sample_steps, cfg=scale,
                                   width=p.width or default_size[0], height=p.height or default_size[1],
                                   negative=p.negative, **extra)
            except NotImplementedError:
                return []
        images.extend(out)
    return images


def save_previews(images: list, folder: Path, step: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"step{step:06d}_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def strength_grid(images_by_strength: list[list], labels: list[str]):
    """A PIL grid: one column per strength, one row per prompt, with the strength written on top."""
    from PIL import Image, ImageDraw

    cols, rows = len(images_by_strength), len(images_by_strength[0])
    w, h = images_by_strength[0][0].size
    label_h = 16
    grid = Image.new("RGB", (cols * w, rows * h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, column in enumerate(images_by_strength):
        draw.text((c * w + 4, 2), labels[c], fill="black")
        for r, image in enumerate(column):
            grid.paste(image.convert("RGB"), (c * w, label_h + r * h))
    return grid
