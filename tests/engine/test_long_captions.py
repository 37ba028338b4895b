"""max_token_length 150 / 225 (kohya's option): long tag lists reach the model instead of being cut
after 75 tokens; hosts whose own text encoding is reused refuse it clearly."""

import pytest
import torch

from engine.config import TrainConfig, load_config
from engine.errors import ConfigError
from engine.lora.kohya_io import read_lora
from engine.model import TrainableModel
from engine.models.clip_tokenizer import clip_tokenizer, window_ids
from engine.models.tiny import tiny_sd1, tiny_sdxl
from engine.train import train

from train_fixtures import pattern_dataset, quick_config

BOS, EOS, CAT = 49406, 49407, 2368
TAGS = ", ".join(f"tag{i}" for i in range(25))  # 89 CLIP tokens, like a short WD14 tag list


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1(seed=0)


def test_windows_frame_each_75_tokens_with_bos_and_eos():
    rows = window_ids(clip_tokenizer(), ["cat " * 300], windows=3).tolist()
    assert len(rows) == 3
    for row in rows:
        assert len(row) == 77 and row[0] == BOS and row[-1] == EOS and row[1:-1] == [CAT] * 75


def test_a_window_past_the_caption_end_is_bos_eos_then_padding():
    first, second = window_ids(clip_tokenizer(), ["a cat"], pad_id=0, windows=2).tolist()
    assert first[:4] == [BOS, 320, CAT, EOS] and set(first[4:]) == {0}
    assert second[:2] == [BOS, EOS] and set(second[2:]) == {0}


def _with_windows(model, n, captions):
    model.set_token_windows(n)
    try:
        with torch.no_grad():
            return model.encode_text(captions)
    finally:
        model.set_token_windows(1)


def test_words_after_75_tokens_reach_the_model_only_with_longer_windows(sd1):
    a, b = TAGS + ", red hair", TAGS + ", blue hair"
    short = _with_windows(sd1, 1, [a, b])["context"]
    assert short.shape[1] == 77 and torch.equal(short[0], short[1])  # cut off: the tail is lost
    long = _with_windows(sd1, 2, [a, b])["context"]
    assert long.shape == (2, 152, short.shape[-1])  # kohya's layout: BOS + 2 x 75 + EOS
    assert not torch.allclose(long[0], long[1])


def test_sdxl_long_captions_keep_the_first_windows_pooled_vector():
    sdxl = tiny_sdxl(seed=0)
    short = _with_windows(sdxl, 1, ["a red cat"])
    long = _with_windows(sdxl, 2, ["a red cat"])
    assert long["context"].shape[1] == 152
    assert torch.allclose(long["pooled"], short["pooled"])
    assert torch.allclose(long["context"][:, :76], short["context"][:, :76])


def test_training_with_max_token_length_150_writes_it_into_the_metadata(sd1, tmp_path):
    data = pattern_dataset(tmp_path / "data")
    (data / "img0.txt").write_text(TAGS, encoding="utf-8")
    result = train(quick_config(data, tmp_path / "out", max_train_steps=2, max_token_length=150), sd1)
    _, meta = read_lora(result.lora_path)
    assert meta["ss_max_token_length"] == "150"
    assert sd1.token_windows == 1  # the model encodes as before once the run is over


def test_a_host_without_long_caption_support_refuses_before_writing_anything(tmp_path):
    host = tiny_sd1(seed=0)
    host.max_token_windows = TrainableModel.max_token_windows  # what the A1111 adapter inherits: one window
    data = pattern_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match="max_token_length 225 is not supported.*set it to 75"):
        train(quick_config(data, tmp_path / "out", max_train_steps=2, max_token_length=225), host)
    assert not (tmp_path / "out").exists()


def test_config_accepts_kohya_values_only(tmp_path):
    assert TrainConfig(max_token_length=225).max_token_length == 225
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_token_length: 255\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_token_length is 255; allowed: 75, 150, 225"):
        load_config(bad)


def test_kohya_style_cache_flags_are_understood(tmp_path):
    cfg = tmp_path / "kohya.yaml"
    cfg.write_text("cache_latents: true\ncache_text_encoder_outputs: false\n", encoding="utf-8")
    loaded = load_config(cfg)
    assert loaded.cache_latents == "memory" and loaded.cache_text_encoder_outputs == "off"
