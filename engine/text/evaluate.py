"""What a text run measures: held-out perplexity before and after training, and sample generations.

Perplexity is exp of the mean next-token loss over the held-out samples' trained tokens (the same
tokens and packing training uses, dropout off), so "before" and "after" compare directly; "before" is
the base model, since a fresh LoRA starts at zero. Samples complete each prompt twice, with the
adapter off (the base model) and on, greedy unless `sample_temperature` is set; a chat-trained run
wraps each prompt in the chat template as a user turn, as a chat front end would.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .packing import IGNORE, RowPlan
from .step import device_inputs

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@torch.no_grad()
def perplexity(forward, plan: RowPlan, device: torch.device) -> dict:
    model = forward.peft_model
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in plan.in_order():
            total += float(forward.loss(device_inputs(batch, device, 1.0)))
            count += int((batch["targets"] != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def load_sample_prompts(setting) -> list[str]:
    """A list of prompts, or the lines of the .txt file a single entry names."""
    prompts = list(setting or [])
    if len(prompts) == 1 and prompts[0].strip().lower().endswith(".txt") and Path(prompts[0]).expanduser().is_file():
        from ..data.captions import read_text

        prompts = read_text(Path(prompts[0]).expanduser()).splitlines()
    return [p for p in prompts if p.strip()]


@torch.no_grad()
def generate_samples(peft_model, tokenizer, encoder, prompts: list[str], cfg, device: torch.device,
                     chat: bool) -> list[dict]:
    if not prompts:
        return []
    stop = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN
                                       if t in tokenizer.get_vocab()]
    stop = [s for s in dict.fromkeys(stop) if s is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0] if stop else 0
    options = dict(max_new_tokens=cfg.sample_max_new_tokens, do_sample=cfg.sample_temperature > 0,
                   pad_token_id=pad, eos_token_id=stop or None, use_cache=True)
    if cfg.sample_temperature > 0:
        options["temperature"] = cfg.sample_temperature
    was_training = peft_model.training
    peft_model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = torch.tensor([encoder.prompt_ids(prompt, chat)], device=device)
            row = {"prompt": prompt}
            for label in ("base", "lora"):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(cfg.sample_seed)
                    with peft_model.disable_adapter() if label == "base" else contextlib.nullcontext():
                        new = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
                row[label] = tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(row)
    finally:
        peft_model.train(was_training)
    return out


def samples_markdown(samples: list[dict], step: int) -> str:
    lines = [f"# Sample generations after step {step}", ""]
    for row in samples:
        lines += [f"## {row['prompt']}", "", "base model:", "", f"> {row['base'].strip() or '(nothing)'}", "",
                  "with the LoRA:", "", f"> {row['lora'].strip() or '(nothing)'}", ""]
    return "\n".join(lines)
