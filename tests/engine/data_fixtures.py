"""Small image folders in tmp dirs and a fake TrainableModel, for the engine/data tests.

The fake model's encoders are cheap and transparent: `encode_images` is an 8x average pool to four
channels (RGB + their mean), so a latent can be compared with the pixels it came from, and
`encode_text` embeds a caption deterministically from its characters. Both count their calls.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.config import TrainConfig
from engine.model import ModelInfo, TrainableModel


def make_image(path: Path, size=(128, 128), color=(200, 30, 30), *, mode="RGB", exif_orientation=None,
               gradient=False) -> Path:
    """Write an image; with `gradient` the pixels vary left->right so flips and crops are visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if gradient:
        x = torch.linspace(0, 255, w).round().to(torch.uint8)
        arr = torch.stack([x.expand(h, w), x.flip(0).expand(h, w), torch.full((h, w), color[2], dtype=torch.uint8)],
                          dim=2)
        img = Image.fromarray(arr.numpy(), "RGB")
    else:
        img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(path, **kwargs)
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def make_folder(root: Path, captions: dict[str, str | None], size=(128, 128), ext=".png") -> Path:
    """{stem: caption or None} -> images (distinct colours) with .txt sidecars where a caption is given."""
    for i, (stem, caption) in enumerate(captions.items()):
        make_image(root / f"{stem}{ext}", size, color=(10 + 20 * i % 250, 100, 200 - 10 * i % 200))
        if caption is not None:
            write_text(root / f"{stem}.txt", caption)
    return root


def make_cfg(data_dir: Path, **overrides) -> TrainConfig:
    base = dict(train_data_dir=str(data_dir), resolution="128", min_bucket_reso=64, max_bucket_reso=256,
                bucket_reso_steps=64, min_image_size=32, seed=7, output_dir=str(data_dir.parent / "out"))
    base.update(overrides)
    return TrainConfig.from_dict(base)


class FakeModel(TrainableModel):
    """Encoders only; the rest of the seam is never called by engine/data."""

    def __init__(self, nan_for_red: bool = False):
        self.info = ModelInfo(family="sd1")
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.image_calls = 0
        self.images_encoded = 0
        self.text_calls = 0
        self.nan_for_red = nan_for_red

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.min() >= -1.0001 and pixels.max() <= 1.0001, "pixels must be in [-1, 1]"
        self.image_calls += 1
        self.images_encoded += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        out = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        if self.nan_for_red:
            red = pooled[:, 0].mean((1, 2)) > 0.5
            out[red] = float("nan")
        return out

    def encode_text(self, captions: list[str]):
        self.text_calls += 1
        rows = [torch.tensor([(zlib.crc32(f"{c}|{i}".encode()) % 1000) / 1000 for i in range(32)]) for c in captions]
        context = torch.stack(rows).view(len(captions), 4, 8)
        return {"context": context, "pooled": context.mean(1)}

    def unet_layers(self):
        return iter(())

    def text_encoder_layers(self):
        return iter(())

    def trainable_roots(self) -> list[nn.Module]:
        return []

    def objective(self):
        from engine.objectives import DDPMObjective

        return DDPMObjective(torch.linspace(0.99, 0.01, 1000))

    def predict(self, noisy, timesteps, cond):
        raise NotImplementedError
