"""bench/quality_order.py: `--batch-order kohya` gives our trainer kohya's batch structure, on the bench's
own data (the demo's 12 pictures, batch 4: 3 batches an epoch), and leaves the engine's order alone.

kohya regroups its pictures only after an epoch's first batch is fetched, so every epoch starts with a
batch of the previous epoch's grouping and then trains on all but one batch of its own new grouping.
"""

import random
from collections import Counter

import pytest

from bench.quality_order import batch_order
from bench.quality_runs import Recipe, ours_config
from engine.data.plan import epoch_batches
from engine.data.train_data import TrainData
from engine.demo import write_dataset

EPOCHS = 34  # the bench's 100 steps at 3 batches an epoch


def _data(tmp_path, seed: int) -> TrainData:
    if not (tmp_path / "train").exists():
        write_dataset(tmp_path / "train", n=12, seed=0)
    cfg = ours_config(tmp_path, Recipe(seed=seed), "lora", tmp_path / "out")
    return TrainData(cfg, native_resolution=64, model_key="demo", train_text_encoder=False)


def _groups(plans) -> list[frozenset]:
    return [frozenset(s.record for s in p.samples) for p in plans]


def _epochs(data: TrainData, order: str) -> list[list[frozenset]]:
    with batch_order(order):
        return [_groups(data.epoch_plan(e)) for e in range(EPOCHS)]


@pytest.mark.parametrize("seed", [0, 1])
def test_kohya_order_starts_each_epoch_with_a_batch_of_the_previous_grouping(tmp_path, seed):
    data = _data(tmp_path, seed)
    own = [_groups(data.epoch_plan(e)) for e in range(EPOCHS)]  # the engine's fresh grouping per epoch
    kohya = _epochs(data, "kohya")
    again = just_before = 0
    for e in range(1, EPOCHS):
        assert len(kohya[e]) == 3 and all(len(g) == 4 for g in kohya[e])
        assert kohya[e][0] in own[e - 1]  # a batch of the previous epoch's grouping ...
        assert set(kohya[e][1:]) < set(own[e]) and len(set(kohya[e][1:])) == 2  # ... then 2 of its own 3
        again += kohya[e][0] in kohya[e - 1]
        just_before += kohya[e][0] == kohya[e - 1][-1]
    # about 2 in 3 epochs repeat a batch the previous epoch trained on, 1 in 3 the one just before
    assert 12 <= again <= 32 and 4 <= just_before <= 20, (again, just_before)
    # so an epoch may see pictures twice and miss others, which ours never does
    assert any(max(Counter(r for g in epoch for r in g).values()) == 2 for epoch in kohya)
    assert all(sorted(r for g in epoch for r in g) == list(range(12)) for epoch in own)


def test_kohya_order_first_batch_comes_from_a_grouping_the_seed_does_not_change(tmp_path):
    firsts = [_data(tmp_path, seed) for seed in range(6)]
    fixed = set(_groups(epoch_batches(firsts[0].samples, lambda r: firsts[0].placements[r].bucket, 4, 0, -1)))
    for data in firsts:
        with batch_order("kohya"):
            assert _groups(data.epoch_plan(0))[0] in fixed


def test_default_order_is_the_engines_and_the_patch_is_undone(tmp_path):
    data = _data(tmp_path, 0)
    engine = [_groups(epoch_batches(data.samples, lambda r: data.placements[r].bucket, 4, 0, e)) for e in range(EPOCHS)]
    assert _epochs(data, "ours") == engine
    _epochs(data, "kohya")
    assert [_groups(data.epoch_plan(e)) for e in range(EPOCHS)] == engine  # restored on leaving
    with pytest.raises(ValueError):
        with batch_order("random"):
            pass


def test_kohya_order_is_a_pure_function_of_seed_and_epoch(tmp_path):
    """The loop asks for an epoch's plan more than once (prefetch, resume): every answer must agree."""
    data = _data(tmp_path, 3)
    assert _epochs(data, "kohya") == _epochs(data, "kohya")
    random.seed(12345)  # the global RNG plays no part
    assert _epochs(data, "kohya") == _epochs(_data(tmp_path, 3), "kohya")
