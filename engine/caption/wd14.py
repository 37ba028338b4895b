"""WD14-style ONNX taggers (SmilingWolf wd-v1-4 / wd-v3 and compatible), run with onnxruntime.

Users already have these files from ComfyUI-WD14-Tagger or the A1111 tagger: `model.onnx` next to
`selected_tags.csv` (`tag_id,name,category,count`; category 9 = rating, 0 = general, 4 = character),
or `<name>.onnx` next to `<name>.csv`. Input and output names, layout and size are read from the
session, so v2 (`input_1:0`, fixed batch) and v3 (`input`, dynamic batch) files both work. A GPU
provider is used when onnxruntime has one; when it fails to start or to run (a common onnxruntime-gpu
problem) the tagger falls back to the CPU and says so.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..data.images import to_rgb
from ..errors import ModelError
from .tags import format_tag, parse_tag_list, tag_key

logger = logging.getLogger(__name__)

RATING, GENERAL, CHARACTER = 9, 0, 4
_GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                  "CoreMLExecutionProvider")


@dataclass
class TagOptions:
    """How probabilities become a caption (defaults as in the WD14 tagger nodes)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: str | Sequence[str] = ""
    replace_underscore: bool = True
    escape_parentheses: bool = True
    character_first: bool = True
    rating: str = "none"  # none | first | last: add the most likely rating tag
    max_tags: int = 0  # 0 = no limit on general tags

    def __post_init__(self):
        if self.rating not in ("none", "first", "last"):
            raise ValueError(f"rating must be none, first or last, got {self.rating!r}")
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability between 0 and 1, got {getattr(self, name)}")


def read_tag_csv(path: str | Path) -> tuple[list[str], list[int]]:
    """Tag names and categories from a `selected_tags.csv`, in model-output order."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ModelError(f"cannot read the tag list {path}: {exc}") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise ModelError(f"{path} is not a WD14 tag list: expected the header tag_id,name,category,count.")
    try:
        return [r["name"] for r in rows], [int(r["category"]) for r in rows]
    except (TypeError, ValueError):
        raise ModelError(f"{path}: the category column must hold numbers (9 rating, 0 general, 4 character).") from None


def select_tags(probs: np.ndarray, names: Sequence[str], categories: Sequence[int], opts: TagOptions) -> list[str]:
    """The formatted tags of one image: characters then general tags, each by falling probability."""
    exclude = parse_tag_list(opts.exclude)
    cats = np.asarray(categories)

    def pick(category: int, threshold: float) -> list[str]:
        idx = np.nonzero((cats == category) & (probs > threshold))[0]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return [names[i] for i in idx if tag_key(names[i]) not in exclude]

    general = pick(GENERAL, opts.general_threshold)
    if opts.max_tags:
        general = general[:opts.max_tags]
    character = pick(CHARACTER, opts.character_threshold)
    tags = character + general if opts.character_first else general + character
    if opts.rating != "none":
        rating_idx = np.nonzero(cats == RATING)[0]
        if len(rating_idx):
            best = names[rating_idx[np.argmax(probs[rating_idx])]]
            if tag_key(best) not in exclude:
                tags = [best] + tags if opts.rating == "first" else tags + [best]
    return [format_tag(t, replace_underscore=opts.replace_underscore, escape_parentheses=opts.escape_parentheses)
            for t in tags]


def find_tag_csv(model_path: Path) -> Path:
    """`selected_tags.csv` beside the model, or `<stem>.csv` (the ComfyUI-WD14-Tagger layout)."""
    for candidate in (model_path.with_suffix(".csv"), model_path.parent / "selected_tags.csv"):
        if candidate.is_file():
            return candidate
    raise ModelError(f"WD14 tagger {model_path.name}: no tag list found. Expected "
                     f"{model_path.parent / 'selected_tags.csv'} or {model_path.with_suffix('.csv')} "
                     f"(download selected_tags.csv from the same model page as the .onnx).")


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if device not in ("auto", "cpu") and not gpu:
        logger.warning("onnxruntime has no GPU provider (installed: %s); tagging on the CPU.", ", ".join(available))
    return gpu[:1] + ["CPUExecutionProvider"]


class WD14Tagger:
    """Tag images with a WD14-style ONNX model. `caption(images)` returns one caption per image."""

    kind = "wd14"

    def __init__(self, model_path: str | Path, tags_path: str | Path | None = None, *, device: str = "auto",
                 options: TagOptions | None = None, batch_size: int = 4):
        self.model_path = Path(model_path)
        if self.model_path.is_dir():
            self.model_path = self.model_path / "model.onnx"
        if not self.model_path.is_file():
            raise ModelError(f"WD14 tagger: {self.model_path} does not exist. Expected the model's .onnx file, "
                             f"or a folder holding model.onnx and selected_tags.csv.")
        self.name = self.model_path.stem if self.model_path.stem != "model" else self.model_path.parent.name
        self.names, self.categories = read_tag_csv(tags_path or find_tag_csv(self.model_path))
        self.options = options or TagOptions()
        self.warnings: list[str] = []
        self._session = self._open(_providers(device))
        self._read_io()
        self.batch_size = 1 if self._fixed_batch else max(1, batch_size)

    # --- session ------------------------------------------------------------------------------------
    def _open(self, providers: list[str]):
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(self.model_path), providers=providers)
        except Exception as exc:
            if providers == ["CPUExecutionProvider"]:
                raise ModelError(f"onnxruntime cannot load {self.model_path}: {exc}. Is it a complete "
                                 f"download of a WD14 tagger model.onnx?") from None
            self._warn(f"{providers[0]} failed to start ({exc}); tagging on the CPU instead.")
            return self._open(["CPUExecutionProvider"])
        if providers[0] != "CPUExecutionProvider" and providers[0] not in session.get_providers():
            self._warn(f"{providers[0]} is installed but could not be used; tagging on the CPU.")
        return session

    def _warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _read_io(self) -> None:
        inp = self._session.get_inputs()[0]
        self._input_name, self._output_name = inp.name, self._session.get_outputs()[0].name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ModelError(f"{self.model_path.name} takes input of shape {shape}; a WD14 tagger takes "
                             f"images (batch, height, width, 3).")
        self._nchw = shape[1] == 3 and shape[3] != 3
        side = shape[2] if self._nchw else shape[1]
        self.size = side if isinstance(side, int) and side > 0 else 448
        self._fixed_batch = isinstance(shape[0], int) and shape[0] == 1
        out_shape = self._session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != len(self.names):
            raise ModelError(f"{self.model_path.name} predicts {out_shape[-1]} tags but its tag list has "
                             f"{len(self.names)}: the .csv belongs to another model.")

    # --- inference ----------------------------------------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        """Pad to a white square, resize to the model's side, BGR float32 in 0-255 (HWC)."""
        from PIL import Image

        image = to_rgb(image)  # transparency on white, as the taggers were trained
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            canvas = canvas.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._nchw:
            batch = batch.transpose(0, 3, 1, 2)
        batch = np.ascontiguousarray(batch)
        try:
            return self._session.run([self._output_name], {self._input_name: batch})[0]
        except Exception as exc:
            if self.providers[0] == "CPUExecutionProvider":
                raise
            self._warn(f"{self.providers[0]} failed while tagging ({exc}); continuing on the CPU.")
            self._session = self._open(["CPUExecutionProvider"])
            return self._session.run([self._output_name], {self._input_name: batch})[0]

    def predict(self, images: Iterable) -> np.ndarray:
        """Tag probabilities, one row per image (the models output probabilities, no sigmoid needed)."""
        arrays = [self.preprocess(im) for im in images]
        rows = [self._run(np.stack(arrays[i:i + self.batch_size]))
                for i in range(0, len(arrays), self.batch_size)]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(self.names)), np.float32)

    def caption(self, images: Sequence, paths: Sequence[Path] | None = None) -> list[str]:
        return [", ".join(select_tags(p, self.names, self.categories, self.options)) for p in self.predict(images)]
