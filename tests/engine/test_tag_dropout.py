"""Tag dropout (kohya's caption_tag_dropout_rate) and caption_dropout_every_n_epochs: tags are dropped
at the given rate with a fixed seed, the kept tokens and the trigger never, and the text-encoder cache
steps aside when captions change every step (kohya refuses to cache then; here it is turned off, said once)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, TrainConfig
from engine.data import TrainData
from engine.data.text import process_caption, sample_rng
from engine.lora.metadata import build_metadata
from engine.models import tiny_sd1

try:
    from .data_fixtures import FakeModel, make_cfg, make_folder
except ImportError:
    from data_fixtures import FakeModel, make_cfg, make_folder

TAGS = [f"tag{i}" for i in range(20)]
CAPTION = ", ".join(["keep a", "keep b"] + TAGS)


def _captions(n, seed=1, **kw):
    return [process_caption(CAPTION, sample_rng(seed, 0, i, "caption"), keep_tokens=2, **kw) for i in range(n)]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7])
def test_tags_are_dropped_at_the_rate_and_kept_tokens_never(rate):
    captions = _captions(1000, tag_dropout=rate)
    kept = 0
    for caption in captions:
        tags = caption.split(", ")
        assert tags[:2] == ["keep a", "keep b"]  # kept tokens: always there, first, in order
        assert [t for t in tags[2:] if t in TAGS] == [t for t in TAGS if t in tags[2:]]  # order kept (no shuffle)
        kept += len(tags) - 2
    dropped = 1 - kept / (1000 * len(TAGS))
    assert abs(dropped - rate) < 0.015, dropped  # 20,000 coins: 3 standard deviations is under 0.01
    assert captions == _captions(1000, tag_dropout=rate)  # the same seed drops the same tags
    assert captions != _captions(1000, seed=2, tag_dropout=rate)


def test_tag_dropout_with_shuffle_and_trigger():
    captions = [process_caption("red, cat, sitting, indoors", sample_rng(3, 0, i, "caption"), trigger_word="ohwx",
                                shuffle=True, tag_dropout=0.5) for i in range(300)]
    assert all(c.split(", ")[0] == "ohwx" for c in captions)  # the trigger is never dropped
    assert len({c for c in captions}) > 20  # shuffled and dropped
    assert any(c == "ohwx" for c in captions)  # every other tag can go


def test_off_changes_nothing():
    assert _captions(50) == [process_caption(CAPTION, sample_rng(1, 0, i, "caption"), keep_tokens=2) for i in range(50)]
    assert _captions(20, shuffle=True, dropout=0.3) == [
        process_caption(CAPTION, sample_rng(1, 0, i, "caption"), keep_tokens=2, shuffle=True, dropout=0.3, tag_dropout=0)
        for i in range(20)]


def test_every_n_epochs_trains_those_epochs_on_empty_captions(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "red, cat", "b": "blue, dog"})
    d = TrainData(make_cfg(root, caption_dropout_every_n_epochs=2, batch_size=1), native_resolution=512,
                  model_key="fake", train_text_encoder=False)
    model = FakeModel()
    d.prepare_cache(model)
    assert d.text_cache_enabled and "" in d.cached_captions()

    def captions(epoch):
        return [c for p in d.epoch_plan(epoch) for c in d.materialize(p, model, epoch=epoch).captions]

    # kohya counts epochs from 1: the 2nd and 4th (our 1 and 3) drop every caption
    assert set(captions(1)) == set(captions(3)) == {""}
    assert "" not in captions(0) and "" not in captions(2)


def test_text_cache_steps_aside_for_tag_dropout(tmp_path):
    root = make_folder(tmp_path / "d", {"a": "red, cat, sitting"})
    d = TrainData(make_cfg(root, caption_tag_dropout_rate=0.5, cache_text_encoder_outputs="on"), native_resolution=512,
                  model_key="fake", train_text_encoder=False)
    assert not d.text_cache_enabled
    assert any("caption_tag_dropout_rate" in w for w in d.warnings)
    model = FakeModel()
    d.prepare_cache(model)
    seen = {c for e in range(6) for p in d.epoch_plan(e) for c in d.materialize(p, model, epoch=e).captions}
    assert len(seen) > 1  # the captions the step sees change; each is encoded at its step


def test_config_metadata_and_kohya_keys():
    with pytest.raises(ConfigError, match="probabilities"):
        TrainConfig.from_dict({"caption_tag_dropout_rate": 1.5})
    cfg = TrainConfig.from_dict({"network_module": "networks.lora", "caption_tag_dropout_rate": 0.1,
                                 "caption_dropout_every_n_epochs": 3})
    assert (cfg.caption_tag_dropout_rate, cfg.caption_dropout_every_n_epochs) == (0.1, 3)
    md = build_metadata(cfg, tiny_sd1().info, data_summary={}, steps=1, epoch=0, total_steps=1, batches_per_epoch=1,
                        started_at=0.0, mixed_precision="no")
    assert (md["ss_caption_tag_dropout_rate"], md["ss_caption_dropout_every_n_epochs"]) == ("0.1", "3")
