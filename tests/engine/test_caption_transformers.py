"""transformers image-to-text captioner: a tiny random BLIP saved to a folder, loaded the way users' are.

The model, its BertTokenizer (from a vocab file written here) and its BlipImageProcessor are built in
code and saved with save_pretrained; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.caption import CaptionOptions, TransformersCaptioner, caption_dataset, load_captioner  # noqa: E402
from engine.caption.cli import caption_main  # noqa: E402
from engine.errors import ModelError  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "grass", "sitting", "green"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    root = tmp_path_factory.mktemp("models")
    folder = root / "captioners" / "tiny-blip"
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    ids = {t: SPECIAL.index(t) for t in SPECIAL}
    text = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
                pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"])
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # never emit special tokens, so every caption has words (random weights otherwise may not)
        model.text_decoder.cls.predictions.bias[:len(SPECIAL)] = -1e4
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def dataset(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(ds / f"img{i}.png")
    return ds


def words(caption):
    return caption.replace(",", " ").split()


def test_loads_by_name_and_writes_one_caption_per_image(blip_dir, dataset):
    captioner = load_captioner("tiny-blip", [blip_dir.parent], device="cpu", batch_size=2, max_length=6)
    assert isinstance(captioner, TransformersCaptioner)
    result = caption_dataset(dataset, captioner, CaptionOptions(trigger="xyz"))
    assert sorted(p.name for p in result.written) == ["img0.txt", "img1.txt", "img2.txt"]
    for i in range(3):
        text = (dataset / f"img{i}.txt").read_text(encoding="utf-8")
        assert text.startswith("xyz, ")
        generated = words(text)[1:]
        assert 1 <= len(generated) <= 6 and set(generated) <= set(WORDS)


def test_prompt_max_length_and_strip_prompt(blip_dir):
    images = [Image.new("RGB", (32, 32), (200, 30, 30))]
    short = TransformersCaptioner(blip_dir, device="cpu", max_length=2).caption(images)[0]
    assert 1 <= len(short.split()) <= 2
    prompted = TransformersCaptioner(blip_dir, device="cpu", prompt="a photo of", max_length=3).caption(images)[0]
    assert prompted.startswith("a photo of ") and len(prompted.split()) > 3
    stripped = TransformersCaptioner(blip_dir, device="cpu", prompt="a photo of", max_length=3,
                                     strip_prompt=True).caption(images)[0]
    assert stripped == prompted[len("a photo of "):]


def test_batches_give_the_same_captions_as_single_images(blip_dir):
    images = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255), (9, 200, 9)]]
    one = TransformersCaptioner(blip_dir, device="cpu", batch_size=1, max_length=5).caption(images)
    three = TransformersCaptioner(blip_dir, device="cpu", batch_size=3, max_length=5).caption(images)
    assert one == three and len(one) == 3


def test_incomplete_folder_says_what_is_missing(blip_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((blip_dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        TransformersCaptioner(broken, device="cpu")
    with pytest.raises(ModelError, match="missing the weights"):
        load_captioner(str(broken))


def test_cli_dry_run_prints_captions_and_writes_nothing(blip_dir, dataset, capsys):
    rc = caption_main([str(dataset), "--model", str(blip_dir), "--device", "cpu", "--dry-run", "--max-length", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert [line.split(":")[0] for line in out.splitlines()[:3]] == ["img0.png", "img1.png", "img2.png"]
    assert not list(dataset.glob("*.txt"))


def test_hugging_face_cache_layout_is_discovered(blip_dir, tmp_path):
    import shutil

    snapshot = tmp_path / "LLM" / "models--someone--tiny-blip" / "snapshots" / "0123abc"
    shutil.copytree(blip_dir, snapshot)
    from engine.caption import find_captioner_models

    found = find_captioner_models([tmp_path / "LLM", blip_dir.parent])
    assert {(m.name, m.kind) for m in found} == {("someone/tiny-blip", "transformers"), ("tiny-blip", "transformers")}
    captioner = load_captioner("someone/tiny-blip", [tmp_path / "LLM"], device="cpu", max_length=3)
    assert captioner.caption([Image.new("RGB", (32, 32))])[0]


def test_decoder_only_git_model_loads_through_the_same_path(tmp_path):
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL[:5] + WORDS) + "\n", encoding="utf-8")
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                             tokenizer=BertTokenizer(str(vocab)))
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    torch.manual_seed(0)
    model = GitForCausalLM(GitConfig(vision_config=vision, vocab_size=5 + len(WORDS), hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    with torch.no_grad():
        model.output.bias[:5] = -1e4  # words only
    folder = tmp_path / "tiny-git"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    captioner = load_captioner(str(folder), device="cpu", max_length=4, batch_size=2, prompt="a photo of")
    assert type(captioner.model).__name__ == "GitForCausalLM"
    captions = captioner.caption([Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 30))])
    assert len(captions) == 2 and all(c.startswith("a photo of ") for c in captions)
