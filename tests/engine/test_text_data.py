"""Text data as a user brings it: lines, documents, JSONL chats, CSV; what is trained; how rows are packed."""

import pytest
import torch

from engine.errors import DatasetError
from engine.text.packing import IGNORE, collate, fit, needs_mask, pack, split_heldout
from engine.text.sources import Sample, read_samples
from engine.text.tokenize import CHATML, Encoder, resolve_chat_template

from text_fixtures import one_thread, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_txt_is_one_sample_a_line_unless_blank_lines_separate_documents(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n\nthird line\n", encoding="utf-8")
    got = read_samples(lines)
    assert [s.segments[0][0] for s in got.samples] == ["first line", "second line", "third line"]
    assert [s.where for s in got.samples] == ["lines.txt line 1", "lines.txt line 2", "lines.txt line 4"]
    docs = tmp_path / "docs.txt"
    docs.write_text("doc one\ncontinues here\n\ndoc two\nalso two lines\n", encoding="utf-8")
    got = read_samples(docs)
    assert [s.segments[0][0] for s in got.samples] == ["doc one\ncontinues here", "doc two\nalso two lines"]
    assert "read as 2 documents" in got.notes[0]
    assert len(read_samples(docs, text_split="line").samples) == 4


def test_jsonl_json_and_csv_records(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "plain"}\n\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
        '{"prompt": "2+2=", "completion": "4"}\n{"instruction": "add", "input": "1 1", "output": "2"}\n'
        '{"text": "   "}\n', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"text": "from json"}]', encoding="utf-8")
    (tmp_path / "c.csv").write_text('text,other\n"from, csv",x\n', encoding="utf-8")
    got = read_samples(tmp_path)
    kinds = [("chat" if s.is_chat else s.segments) for s in got.samples]
    assert kinds[:5] == [[("plain", True)], "chat", "chat", [("2+2=", False), ("4", True)], "chat"]
    assert got.samples[2].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert got.samples[4].messages[0]["content"] == "add\n\n1 1"
    assert [s.segments[0][0] for s in got.samples[5:]] == ["from json", "from, csv"]
    assert got.skipped == ["a.jsonl line 7"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"\n  \n", "no text to train on"),
    ("gbk.txt", "中文训练数据".encode("gbk"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "bad.jsonl line 2 is not JSON"),
    ("keys.jsonl", b'{"body": "x"}\n', r"has no field to train on \(its keys: body\)"),
    ("roles.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', "has role 'bot'"),
])
def test_bad_text_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_samples(tmp_path / name)


def test_plain_text_trains_every_token_and_ends_with_eos(tok):
    enc = Encoder(tok, None).encode(Sample("x", segments=[("the red cat sees the dog.", True)]))
    assert enc.ids[0] == tok.bos_token_id and enc.ids[-1] == tok.eos_token_id
    assert enc.trained == [False] + [True] * (len(enc.ids) - 1)
    both = Encoder(tok, None).encode(Sample("x", segments=[("what is a cat?", False), (" a small animal.", True)]))
    trained = tok.decode([i for i, t in zip(both.ids, both.trained) if t])
    assert trained == " a small animal.</s>"


def test_chat_loss_covers_only_the_assistant_turns(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"},
                {"role": "assistant", "content": "a small animal."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world"}]
    enc = Encoder(tok, tok.chat_template).encode(Sample("c", messages=messages))
    assert enc.ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    spans, current = [], []
    for i, t in zip(enc.ids, enc.trained):
        if t:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current)) if current else None
    assert spans == ["a small animal.<|im_end|>\n", "hello world<|im_end|>\n"]
    # after packing, the targets are exactly those tokens, predicted from the position before each
    batch = collate([enc], [[0]], len(enc) + 4, tok.pad_token_id)
    targets = batch["targets"][0]
    assert targets[:len(enc) - 1].tolist() == [i if t else IGNORE for i, t in zip(enc.ids[1:], enc.trained[1:])]
    assert (targets[len(enc) - 1:] == IGNORE).all()


def test_chat_template_resolution(tok, tmp_path):
    assert resolve_chat_template(tok, "auto") == (tok.chat_template, False)
    assert resolve_chat_template(tok, "chatml") == (CHATML, True)
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_chat_template(tok, str(tmp_path / "t.jinja"))[1]
    bare = tiny_tokenizer(chat_template=None)
    with pytest.raises(DatasetError, match="no chat template. Set chat_template: chatml"):
        Encoder(bare, resolve_chat_template(bare, "auto")[0]).encode(
            Sample("c.jsonl line 1", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))


def test_long_samples_follow_the_policy(tok):
    long = Encoder(tok, None).encode(Sample("data.txt line 7", segments=[("the red cat " * 30, True)]))
    short = Encoder(tok, None).encode(Sample("data.txt line 8", segments=[("the dog.", True)]))
    n = len(long)
    cut = fit([long, short], [False, False], 32, "truncate")
    assert [len(s) for s in cut.samples] == [32, len(short)] and cut.long[0].where == "data.txt line 7"
    split = fit([long, short], [False, False], 32, "split")
    assert [len(s) for s in split.samples[:-1]] == [32] * (n // 32) + ([n % 32] if n % 32 else [])
    assert sum(len(s) for s in split.samples[:-1]) == n
    assert len(fit([long, short], [False, False], 32, "drop").samples) == 1
    with pytest.raises(DatasetError, match=rf"data.txt line 7 \({n} tokens\).*Raise max_length"):
        fit([long, short], [False, False], 32, "error")


def test_packing_fits_whole_samples_and_keeps_them_apart():
    lengths = [9, 7, 5, 4, 3, 3, 1]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and len(rows) == 4
    from engine.text.tokenize import Encoded

    samples = [Encoded(list(range(10, 10 + n)), [False] + [True] * (n - 1), str(n)) for n in (3, 4)]
    batch = collate(samples, [[0, 1]], 8, 0)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 10, 11, 12, 13, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["segments"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert batch["targets"][0].tolist() == [11, 12, IGNORE, 11, 12, 13, IGNORE, IGNORE]
    assert needs_mask(batch) and not needs_mask(collate(samples, [[1]], 8, 0))


def test_heldout_split_is_seeded_and_leaves_something_to_train():
    train, held = split_heldout(100, 0.05, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and split_heldout(100, 0.05, seed=3) == (train, held)
    assert split_heldout(1, 0.5, 0) == ([0], []) and len(split_heldout(3, 10, 0)[1]) == 2
    assert torch.equal(torch.tensor(split_heldout(10, 2, 0)[1]), torch.tensor(split_heldout(10, 2, 0)[1]))
