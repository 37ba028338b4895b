"""Tiny language models for the text-mode tests, built in code: a byte-level BPE tokenizer trained on a
toy corpus in milliseconds, and Llama / Qwen2 / Qwen3 / Mistral / GPT-2 layouts of a few thousand
parameters (real module names and code paths, random weights), saved as local transformers folders."""

from __future__ import annotations

import random
from pathlib import Path

import torch

import pytest

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_ADJ = ["red", "blue", "green", "small", "big", "old"]
_NOUN = ["cat", "dog", "fox", "bird", "fish", "cow"]
_VERB = ["sees", "likes", "finds", "chases"]


def toy_lines(n: int, seed: int = 0) -> list[str]:
    """Sentences of a tiny grammar: structure a model of a few thousand weights learns in a few steps."""
    rng = random.Random(seed)
    return [f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} "
            f"{rng.choice(_NOUN)}." for _ in range(n)]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = toy_lines(200, seed=99) + ["hello world, what is a cat? a cat is a small animal."]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_config(kind: str, tokenizer, **changes):
    """A transformers config of the given layout at toy sizes (GQA where the layout has it)."""
    import transformers

    # initializer_range 0.2 (not 0.02): logits far enough from uniform that a LoRA moves them within seconds
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common, **changes)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    if kind == "qwen3":
        sizes["head_dim"] = 8
    return classes[kind](**{**sizes, **common, **changes})


def tiny_model(kind: str = "llama", seed: int = 0, tokenizer=None, **changes):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer, **changes))
    return model.float().eval(), tokenizer


def save_tiny_model(folder: Path, kind: str = "llama", seed: int = 0, **changes) -> Path:
    model, tokenizer = tiny_model(kind, seed, **changes)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tensors of a few thousand elements: one CPU thread is faster than several (and far faster when
    other processes share the cores); the setting is put back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
