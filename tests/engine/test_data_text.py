"""Per-step caption processing: trigger word, tag shuffling with keep_tokens, caption dropout."""

from __future__ import annotations

from engine.data.text import process_caption, sample_rng


def run(caption, n=200, **kw):
    return [process_caption(caption, sample_rng(1, 0, i, "caption"), **kw) for i in range(n)]


def test_trigger_is_inserted_first_when_absent_and_moved_first_when_present():
    assert run("red hair, smile", 1, trigger_word="ohwx")[0] == "ohwx, red hair, smile"
    assert run("red hair, ohwx, smile", 1, trigger_word="ohwx")[0] == "ohwx, red hair, smile"
    assert run("a photo of ohwx woman", 1, trigger_word="ohwx")[0] == "a photo of ohwx woman"
    assert run("", 1, trigger_word="ohwx")[0] == "ohwx"
    assert run("  plain caption ", 1)[0] == "plain caption"


def test_trigger_stays_first_while_tags_shuffle():
    outs = run("a, b, c, d, e", trigger_word="ohwx", shuffle=True)
    assert all(o.split(", ")[0] == "ohwx" for o in outs)
    assert all(sorted(o.split(", ")[1:]) == ["a", "b", "c", "d", "e"] for o in outs)
    assert len(set(outs)) > 20  # really shuffled


def test_keep_tokens_hold_the_leading_tags():
    outs = run("1girl, solo, a, b, c, d", shuffle=True, keep_tokens=2)
    assert all(o.startswith("1girl, solo, ") for o in outs)
    assert len({o for o in outs}) > 10
    # with a trigger, keep_tokens counts it (kohya users set keep_tokens=1 for the trigger)
    outs = run("x, y, z", trigger_word="ohwx", shuffle=True, keep_tokens=2)
    assert all(o.startswith("ohwx, x, ") for o in outs)


def test_caption_dropout_frequency_and_empty_caption():
    outs = run("ohwx, tag", n=2000, dropout=0.25)
    dropped = sum(o == "" for o in outs) / len(outs)
    assert 0.21 < dropped < 0.29
    assert set(outs) == {"", "ohwx, tag"}
    assert run("ohwx, tag", n=50, dropout=0.0) == ["ohwx, tag"] * 50


def test_processing_is_a_pure_function_of_seed_epoch_and_slot():
    kw = dict(trigger_word="t", shuffle=True, dropout=0.3)
    a = [process_caption("a, b, c, d", sample_rng(5, 2, i, "caption"), **kw) for i in range(30)]
    b = [process_caption("a, b, c, d", sample_rng(5, 2, i, "caption"), **kw) for i in range(30)]
    c = [process_caption("a, b, c, d", sample_rng(5, 3, i, "caption"), **kw) for i in range(30)]
    assert a == b and a != c
    # the dropout coin does not depend on whether shuffling is on
    plain = [process_caption("a, b", sample_rng(5, 2, i, "caption"), dropout=0.3) == "" for i in range(30)]
    assert plain == [x == "" for x in a]
