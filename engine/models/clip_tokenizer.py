"""CLIP tokenizers built offline from the BPE file shipped in `engine/assets/clip/`.

Every SD text encoder uses OpenAI's CLIP byte-pair encoding (49,408 tokens, `<|startoftext|>` =
49406, `<|endoftext|>` = 49407, 77 positions). They differ only in the padding id:

- SD1.x and SDXL's first encoder pad with `<|endoftext|>` (49407, openai/clip-vit-large-patch14),
- SD2.x and SDXL's second encoder pad with id 0 (`!`), as OpenCLIP does.

Padding is applied by `tokenize(..., pad_id=)` after tokenizing, not by registering `!` as the pad
token: transformers then treats every `!` in a caption as a special token ("cat!!" would become
two id-0 tokens instead of BPE token 748), which is not what OpenCLIP fed the model in training.

The vocabulary is rebuilt from the merges the same way CLIP does (256 byte symbols, the same with
`</w>`, one token per merge, then the two specials), so no hub tokenizer files are ever needed.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import os
import tempfile
from pathlib import Path

from ..families.clip import BANG_ID, EOS_ID  # noqa: F401 - the two padding ids

BPE_FILE = Path(__file__).resolve().parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges; the file holds more


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    order, chars, extra = printable[:], printable[:], 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id table and its ordered merges, derived from the shipped BPE file."""
    if not BPE_FILE.is_file():
        from ..errors import ModelError

        raise ModelError(f"the CLIP tokenizer data {BPE_FILE} is missing; reinstall the extension "
                         f"(git checkout engine/assets).")
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _N_MERGES]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _files_for_old_transformers() -> tuple[str, str]:
    """vocab.json + merges.txt in a cache folder, for transformers 4.x whose tokenizers take paths."""
    vocab, merges = clip_vocab_and_merges()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inplace-lora" / "clip"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "inplace-lora-clip"
        root.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = root / "vocab.json", root / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        for path, text in ((vocab_path, json.dumps(vocab, ensure_ascii=False)),
                           (merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    return str(vocab_path), str(merges_path)


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """A transformers CLIP tokenizer (fast), max length 77, padding with <|endoftext|>. Cached: treat
    it as read-only."""
    from transformers import CLIPTokenizerFast

    common = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=MAX_LENGTH)
    params = inspect.signature(CLIPTokenizerFast.__init__).parameters
    if "vocab" in params:  # transformers >= 5 builds straight from the tables
        vocab, merges = clip_vocab_and_merges()
        tok = CLIPTokenizerFast(vocab=dict(vocab), merges=list(merges), **common)
    else:
        vocab_file, merges_file = _files_for_old_transformers()
        tok = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file, **common)
    tok.model_max_length = MAX_LENGTH
    return tok


def tokenize(tokenizer, captions: list[str], pad_id: int | None = None):
    """[B, 77] input ids: BOS, tokens (truncated to 75), EOS, then `pad_id` (default: the
    tokenizer's own padding) in every position after the first EOS."""
    import torch

    ids = tokenizer(list(captions), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    if pad_id is not None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
        first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)
        ids = ids.masked_fill(torch.arange(ids.shape[1]) > first_eos, pad_id)
    return ids


def window_ids(tokenizer, captions: list[str], pad_id: int | None = None, windows: int = 1):
    """[B * windows, 77] input ids for kohya's `max_token_length` = 75 * windows: the caption's first
    75 * windows tokens cut into 75-token windows, each framed BOS ... EOS and padded as `tokenize`
    pads (a window past the caption's end is BOS, EOS, padding). `join_windows` joins the encoder's
    outputs back into one [B, 2 + 75 * windows, D] sequence, as kohya does."""
    import torch

    if windows == 1:
        return tokenize(tokenizer, captions, pad_id)
    body = MAX_LENGTH - 2
    ids = tokenizer(list(captions), padding="max_length", max_length=body * windows + 2, truncation=True,
                    return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
    first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)
    ids = ids.masked_fill(torch.arange(ids.shape[1]) > first_eos, eos)  # every tokenizer pads with EOS here
    ends = torch.full((ids.shape[0], 1), eos, dtype=ids.dtype)
    chunks = [torch.cat([ids[:, :1], ids[:, 1 + body * i:1 + body * (i + 1)], ends], dim=1) for i in range(windows)]
    out = torch.stack(chunks, dim=1).reshape(-1, MAX_LENGTH)
    if pad_id is not None:
        first_eos = (out == eos).int().argmax(dim=1, keepdim=True)
        out = out.masked_fill(torch.arange(MAX_LENGTH) > first_eos, pad_id)
    return out


def join_windows(hidden, windows: int):
    """[B * windows, 77, D] encoder states -> [B, 2 + 75 * windows, D]: the first window's BOS, every
    window's 75 token states, the last window's final state (kohya's max_token_length layout)."""
    import torch

    if windows == 1:
        return hidden
    b = hidden.shape[0] // windows
    h = hidden.reshape(b, windows, MAX_LENGTH, hidden.shape[-1])
    body = h[:, :, 1:MAX_LENGTH - 1].reshape(b, windows * (MAX_LENGTH - 2), hidden.shape[-1])
    return torch.cat([h[:, 0, :1], body, h[:, -1, MAX_LENGTH - 1:]], dim=1)


