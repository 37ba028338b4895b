"""Aspect-ratio buckets, resolution for resolution the ones kohya sd-scripts uses.

Matching kohya matters beyond habit: `ss_bucket_info` in the saved file, and users' intuition for what
"512 with buckets" means, both assume its list. The rule (model_util.make_bucket_resolutions): keep
the area of the training resolution; widths step by `bucket_reso_steps` from min to max; height is
min(max, floor(area / width / step) * step); transposes are included, plus the square. An image goes
to the bucket with the nearest aspect ratio, is scaled to cover it and cropped. With `no_upscale`
every image gets its own bucket: shrunk only when it exceeds the area, then floored to the step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """Sorted (width, height) buckets whose area is at most max_reso's area."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where an image lands: resize to `resized` (w, h), then crop a `bucket` (w, h) window from it."""

    bucket: tuple[int, int]
    resized: tuple[int, int]

    def centre_crop(self) -> tuple[int, int]:
        return (self.resized[0] - self.bucket[0]) // 2, (self.resized[1] - self.bucket[1]) // 2

    def random_crop(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(0, self.resized[0] - self.bucket[0]), rng.randint(0, self.resized[1] - self.bucket[1])


def cover(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest scaling of `size` (w, h) that covers `target`, rounded as kohya rounds."""
    w, h = size
    tw, th = target
    if w / h > tw / th:  # wider than the target: match heights
        scale = th / h
    else:
        scale = tw / w
    return max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5))


class BucketAssigner:
    """Chooses a Placement per image: fixed resolution, kohya predefined buckets, or no-upscale buckets."""

    def __init__(self, resolution: tuple[int, int], *, enable: bool = True, min_size: int = 256,
                 max_size: int = 1024, steps: int = 64, no_upscale: bool = False):
        self.resolution = resolution
        self.enable = enable
        self.no_upscale = no_upscale and enable
        self.steps = steps
        self.max_area = resolution[0] * resolution[1]
        max_size = max(max_size, *resolution)
        min_size = min(min_size, *resolution)
        self.resos = make_bucket_resolutions(resolution, min_size, max_size, steps) if enable else [resolution]
        self._ratios = [w / h for w, h in self.resos]
        self._reso_set = set(self.resos)

    def place(self, width: int, height: int) -> Placement:
        if not self.enable:
            return Placement(self.resolution, cover((width, height), self.resolution))
        if self.no_upscale:
            return self._place_no_upscale(width, height)
        if (width, height) in self._reso_set:
            return Placement((width, height), (width, height))
        ratio = width / height
        errors = [abs(r - ratio) for r in self._ratios]
        bucket = self.resos[errors.index(min(errors))]  # first minimum, as numpy's argmin
        return Placement(bucket, cover((width, height), bucket))

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def _place_no_upscale(self, width: int, height: int) -> Placement:
        ratio = width / height
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ratio)
            rh = self.max_area / rw
            bw_w = self._round(rw)
            bh_w = self._round(bw_w / ratio)
            bh_h = self._round(rh)
            bw_h = self._round(bh_h * ratio)
            err_w = abs(bw_w / bh_w - ratio) if bh_w else math.inf
            err_h = abs(bw_h / bh_h - ratio) if bh_h else math.inf
            if err_w < err_h:
                resized = (bw_w, int(bw_w / ratio + 0.5))
            else:
                resized = (int(bh_h * ratio + 0.5), bh_h)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) == 0:  # a side below one step: the only case where we must upscale
            bucket = (max(bucket[0], self.steps), max(bucket[1], self.steps))
            resized = cover(resized, bucket)
        return Placement(bucket, resized)
