"""Preview images rendered by the WebUI itself (`StableDiffusionProcessingTxt2Img`).

During training the LoRA is attached as hooks, so previews are plain prompts. After the run the
saved file is tried through the built-in Lora extension exactly as a user would, `<lora:name:S>` at
several strengths, from one seed: the grid shows what each strength does, and the image nearest 0.8
becomes the card's preview (`<name>.preview.png` beside the file). Callers hold the queue lock.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from . import host

logger = logging.getLogger(__name__)
DEFAULT_STRENGTHS = (0.0, 0.5, 0.8, 1.0)


@dataclass
class PreviewSettings:
    prompt: str = ""
    negative: str = ""
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    seed: int = 1234
    steps: int = 20
    cfg: float = 7.0
    width: int = 0  # 0: the training resolution
    height: int = 0
    sampler: str = "Euler"

    @classmethod
    def from_request(cls, data: dict) -> "PreviewSettings":
        known = {k: data[k] for k in ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "sampler")
                 if k in data and data[k] not in (None, "")}
        settings = cls(**known)
        if data.get("strengths") not in (None, ""):
            raw = data["strengths"]
            items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
            try:
                settings.strengths = tuple(float(s) for s in items)
            except ValueError:
                from engine.errors import ConfigError

                raise ConfigError(f"preview strengths must be numbers such as 0, 0.5, 0.8, 1; got {raw!r}.") from None
        for name in ("seed", "steps", "width", "height"):
            setattr(settings, name, int(getattr(settings, name)))
        settings.cfg = float(settings.cfg)
        return settings


@dataclass
class StrengthPreviews:
    images: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    grid: object = None
    card: Path | None = None
    grid_path: Path | None = None


def txt2img(prompt: str, *, negative: str = "", seed: int = 1234, steps: int = 20, cfg: float = 7.0,
            width: int = 512, height: int = 512, sampler: str = "Euler") -> tuple[list, list[str]]:
    """One image through the WebUI's txt2img pipeline (no files written); (images, infotexts)."""
    from modules import processing, shared

    host.clear_condition_cache()  # hooks or a new file change what the same prompt encodes to
    cls = processing.StableDiffusionProcessingTxt2Img
    extra = {"scheduler": "Automatic"} if "scheduler" in getattr(cls, "__dataclass_fields__", {}) else {}
    p = cls(sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative, seed=int(seed), steps=int(steps),
            cfg_scale=float(cfg), width=int(width), height=int(height), sampler_name=sampler, batch_size=1,
            n_iter=1, do_not_save_samples=True, do_not_save_grid=True, do_not_reload_embeddings=True, **extra)
    p.scripts, p.script_args = _no_scripts(), []
    with closing(p):
        result = processing.process_images(p)
    images = list(result.images or [])
    if images:
        shared.state.assign_current_image(images[0])
    return images, list(result.infotexts or [])


def txt2img_images(prompts: list[str], **settings) -> list:
    """The images of one txt2img per prompt (what the adapters' in-training previews render)."""
    images = []
    for prompt in prompts:
        images += txt2img(prompt, **settings)[0]
    return images


def _no_scripts():
    """An empty script runner: no always-on script (ControlNet, ADetailer...) runs on a preview, and
    hosts that read `p.scripts.alwayson_scripts` unguarded (reForge) get an empty list, not None."""
    try:
        from modules import scripts

        return scripts.ScriptRunner()
    except (ImportError, AttributeError, TypeError):
        return None


def lora_prompt(prompt: str, name: str, strength: float) -> str:
    return prompt if strength == 0 else f"{prompt} <lora:{name}:{strength:g}>"


def strength_previews(name: str, settings: PreviewSettings, lora_file: Path, work_folder: Path,
                      size: tuple[int, int]) -> StrengthPreviews:
    """Render `<lora:name:S>` for each strength, write the grid to the work folder and the card preview
    beside `lora_file`."""
    from engine.sample import strength_grid

    width, height = settings.width or size[0], settings.height or size[1]
    out = StrengthPreviews()
    for strength in settings.strengths:
        images, infos = txt2img(lora_prompt(settings.prompt, name, strength), negative=settings.negative,
                                seed=settings.seed, steps=settings.steps, cfg=settings.cfg, width=width,
                                height=height, sampler=settings.sampler)
        if not images:  # interrupted
            break
        out.images.append(images[0])
        out.labels.append(f"{strength:g}")
        out.infotexts.append(infos[0] if infos else "")
    if not out.images:
        return out
    out.grid = strength_grid([[im] for im in out.images], out.labels)
    work_folder.mkdir(parents=True, exist_ok=True)
    out.grid_path = work_folder / f"{name}.strengths.png"
    out.grid.save(out.grid_path)
    best = min(range(len(out.images)), key=lambda i: abs(float(out.labels[i]) - 0.8))
    out.card = lora_file.with_name(f"{lora_file.stem}.preview.png")
    out.images[best].save(out.card)
    return out
