"""PIL images as ComfyUI IMAGE tensors; the loss chart itself is drawn by engine.plot."""

from __future__ import annotations

from ..engine.plot import ema, loss_plot  # noqa: F401  (re-exported for the nodes)


def pil_to_image_tensor(images):
    """PIL image(s) -> ComfyUI IMAGE [B,H,W,3] float 0..1 (all images resized to the first's size)."""
    import numpy as np
    import torch

    images = images if isinstance(images, (list, tuple)) else [images]
    size = images[0].size
    arrays = [np.asarray(im.convert("RGB").resize(size), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))
