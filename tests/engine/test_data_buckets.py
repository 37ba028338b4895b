"""Aspect-ratio buckets must be the ones kohya sd-scripts makes (ss_bucket_info, user expectations)."""

from __future__ import annotations

from engine.data import BucketAssigner, make_bucket_resolutions

# Derived by hand from kohya's make_bucket_resolutions(max_reso, min_size, max_size, divisible):
# area = 512*512; for w in 256..1024 step 64: h = min(1024, (area // w) // 64 * 64), kept if h >= 256,
# plus transposes and the square (512, 512).
KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]


def test_buckets_for_512_equal_kohya():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512


def test_buckets_for_1024_sdxl_equal_kohya():
    got = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(got) == 41
    for reso in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                 (1536, 640), (640, 1536), (2048, 512), (512, 2048), (2048, 256), (256, 2048)]:
        assert reso in got
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in got)
    assert (1088, 1024) not in got  # never above the training area


def test_buckets_for_1024_with_max_1024_cap_the_long_side():
    got = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert max(max(r) for r in got) == 1024 and (1024, 1024) in got
    assert (1024, 256) in got and (1024, 960) in got and len(got) == 25  # wide images lose area


def test_image_goes_to_nearest_aspect_bucket_covered_then_centre_cropped():
    b = BucketAssigner((512, 512), min_size=256, max_size=1024, steps=64)
    p = b.place(1920, 1080)  # 16:9 -> 640x384 (ratio 1.67) is nearest
    assert p.bucket == (640, 384) and p.resized == (683, 384) and p.centre_crop() == (21, 0)
    assert b.place(1080, 1920).bucket == (384, 640)
    assert b.place(512, 512) == b.place(2000, 2000).__class__((512, 512), (512, 512))
    assert b.place(2000, 2000).resized == (512, 512)
    assert b.place(640, 384).resized == (640, 384)  # an exact bucket size is used as is


def test_no_upscale_gives_each_image_its_own_bucket():
    b = BucketAssigner((512, 512), min_size=256, max_size=1024, steps=64, no_upscale=True)
    small = b.place(300, 200)
    assert small.bucket == (256, 192) and small.resized == (300, 200)  # not enlarged, cropped to the step
    big = b.place(3000, 2000)
    assert big.bucket == (576, 384) and big.resized == (576, 384)  # shrunk to the area, kohya rounding


def test_buckets_off_means_fixed_resolution_cover_and_crop():
    b = BucketAssigner((128, 128), enable=False)
    p = b.place(200, 100)
    assert p.bucket == (128, 128) and p.resized == (256, 128) and p.centre_crop() == (64, 0)
    assert b.place(50, 60).bucket == (128, 128)  # small images are enlarged to cover
