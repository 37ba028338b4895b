"""The tools bench/text_llm.py compares, one per process: `python -m bench.text_llm_tools '{spec as JSON}'`.

- ours: `engine.text.train.train_text` on the model built in code and the rows as its data (the real
  loop: lean forward, chunked loss, CUDA-graphed step where it applies, events);
- hf-trainer: transformers' `Trainer` on `peft.get_peft_model(model, LoraConfig(...))`, bf16 autocast,
  `default_data_collator`, labels = input ids;
- trl-sft: TRL's `SFTTrainer` with the same `LoraConfig` as `peft_config` and the rows as a
  pre-tokenized dataset (TRL skips its own tokenization; packing off: every row is already full).

Same LoRA, rows, batch, optimizer (fused AdamW), learning rate, warm-up, clipping and checkpointing for
all three; each step is timed by a callback that syncs the device (bench/common.StepClock).
"""

from __future__ import annotations

import json
import sys
import tempfile

from .common import StepClock
from .text_llm import LAYOUTS, build_model, token_rows

LR = 2e-4


class Clock(StepClock):
    """StepClock that also reads the memory peak at the last timed step."""

    def __init__(self, last: int):
        super().__init__()
        self.last, self.peak = last, None

    def tick(self) -> None:
        super().tick()
        if len(self.stamps) - 1 == self.last and self.torch.cuda.is_available():
            self.peak = self.torch.cuda.max_memory_allocated() / 2**30


def _targets(spec):
    return "all-linear" if spec["targets"] == "all-linear" else spec["targets"].split(",")


def _common(spec, cuda: bool) -> dict:
    total = spec["warmup"] + spec["steps"]
    return dict(per_device_train_batch_size=spec["batch"], max_steps=total, learning_rate=LR,
                lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, round(0.03 * total)), bf16=cuda,
                gradient_checkpointing=spec["gradient_checkpointing"],
                gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch_fused" if cuda else
                "adamw_torch", save_strategy="no", report_to="none", logging_steps=total, seed=0, max_grad_norm=1.0,
                weight_decay=0.0, use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0)


def _lora(spec):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=spec["dropout"],
                      target_modules=_targets(spec), bias="none", task_type="CAUSAL_LM")


def _trainer_callback(clock):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    return Timer()


def run_ours(model, tokens, spec, clock, cuda: bool, out: str) -> list[str]:
    from engine.events import FunctionCallback
    from engine.text.config import TextConfig
    from engine.text.dataset import text_data_from
    from engine.text.tokenize import Encoded
    from engine.text.train import train_text

    total = spec["warmup"] + spec["steps"]
    cfg = TextConfig(output_dir=out, output_name="bench", max_length=spec["seq"], batch_size=spec["batch"],
                     max_train_steps=total, epochs=1, learning_rate=LR, lora_rank=spec["rank"],
                     lora_alpha=2 * spec["rank"], lora_dropout=spec["dropout"], target_modules=_targets(spec),
                     gradient_checkpointing=spec["gradient_checkpointing"], mixed_precision="bf16" if cuda else "no",
                     lr_scheduler="constant_with_warmup", warmup_steps=max(1, round(0.03 * total)),
                     save_every_n_epochs=0, eval_split=0, seed=0, device="cuda" if cuda else "cpu",
                     torch_compile=spec["tool"] == "ours-compile")
    seq = spec["seq"]
    samples = [Encoded(row.tolist(), [False] + [True] * (seq - 1), f"row {i}") for i, row in enumerate(tokens)]
    notes: list[str] = []

    def on_event(event):
        if event.kind == "start":
            clock.start()
        elif event.kind == "step":
            clock.tick()
        elif event.kind == "info":
            notes.append(event.message)

    result = train_text(cfg, callbacks=[FunctionCallback(on_event)], model=model, data=text_data_from(samples, cfg))
    graphed = cuda and not any("not CUDA-graphed" in n for n in notes)
    return notes + [f"forward: {result.forward_path}", f"graphed: {graphed}",
                    f"loss first {result.losses[0]:.4f} last {result.losses[-1]:.4f}"]


def run_hf(model, tokens, spec, clock, cuda: bool, out: str) -> list[str]:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = get_peft_model(model, _lora(spec))
    rows = [{"input_ids": row, "labels": row} for row in tokens]
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=out, remove_unused_columns=False,
                                                          **_common(spec, cuda)),
                      train_dataset=rows, data_collator=default_data_collator, callbacks=[_trainer_callback(clock)])
    result = trainer.train()
    return [f"mean loss {result.training_loss:.4f}"]


def run_trl(model, tokens, spec, clock, cuda: bool, out: str) -> list[str]:
    import datasets
    import trl
    from trl import SFTConfig, SFTTrainer

    vocab = LAYOUTS[spec["model"]]["vocab_size"]
    args = SFTConfig(output_dir=out, max_length=spec["seq"], packing=False, **_common(spec, cuda))
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": tokens.tolist()}),
                         processing_class=word_tokenizer(vocab), peft_config=_lora(spec),
                         callbacks=[_trainer_callback(clock)])
    result = trainer.train()
    return [f"trl {trl.__version__}", f"mean loss {result.training_loss:.4f}"]


def word_tokenizer(vocab: int):
    """A tokenizer of the layout's vocabulary size (TRL wants one); its words never matter here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def row_for(spec: dict) -> dict:
    import statistics

    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(spec["model"], device, dtype)
    tokens = token_rows(spec["model"], (spec["warmup"] + spec["steps"]) * spec["batch"], spec["seq"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(spec["warmup"] + spec["steps"])
    runner = {"ours": run_ours, "ours-compile": run_ours, "hf-trainer": run_hf, "trl-sft": run_trl}[spec["tool"]]
    with tempfile.TemporaryDirectory() as out:
        notes = runner(model, tokens, spec, clock, cuda, out)
    times = clock.step_times(spec["warmup"])
    import peft
    import transformers

    row = {**spec, "device": torch.cuda.get_device_name() if cuda else "cpu", "steps_timed": len(times),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "notes": notes}
    if times:
        median = statistics.median(times)
        row.update(step_ms=round(median * 1000, 2), tokens_per_s=round(spec["batch"] * spec["seq"] / median, 1))
    row["peak_gib"] = round(clock.peak, 3) if clock.peak is not None else None
    return row


def equivalence(layout: str, seq: int) -> dict:
    """Ours (lean forward, chunked loss, bf16 LoRA) against transformers + PEFT's full-logits loss on the same
    weights, LoRA and packed batch (one row of two samples, one of one): loss, and per-tensor cosine of the
    LoRA gradients; also ours with checkpointing against ours without."""
    import torch

    from engine.text.config import TextConfig
    from engine.text.loss import logits_loss
    from engine.text.model import attach_lora
    from engine.text.packing import IGNORE, collate, needs_mask
    from engine.text.step import TextForward, device_inputs
    from engine.text.tokenize import Encoded

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = TextConfig(lora_rank=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", max_length=seq)
    wrapped = attach_lora(build_model(layout, device, dtype), cfg, seed=0)
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(1)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=g)
    ids = token_rows(layout, 3, seq).tolist()
    half = seq // 2
    samples = [Encoded(ids[0][:half], [False] + [True] * (half - 1), "a"),
               Encoded(ids[1][:seq - half], [False] + [True] * (seq - half - 1), "b"),
               Encoded(ids[2], [False] + [True] * (seq - 1), "c")]
    batch = collate(samples, [[0, 1], [2]], seq, 0)
    batch["masked"] = needs_mask(batch)
    denominator = int((batch["targets"] != IGNORE).sum())
    inp = device_inputs(batch, torch.device(device), denominator)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    forward = TextForward(wrapped, cfg)
    results = {}
    for label, checkpointing in (("ours", False), ("ours_checkpointing", True)):
        forward.checkpointing = checkpointing
        loss = forward.loss(inp)
        results[label] = (loss.item(), torch.autograd.grad(loss, params))
    logits = wrapped(input_ids=inp["input_ids"], position_ids=inp["position_ids"], use_cache=False).logits
    ref = logits_loss(logits, inp["targets"], inp["denominator"])
    results["transformers"] = (ref.item(), torch.autograd.grad(ref, params))

    def cosines(a, b):
        return [torch.nn.functional.cosine_similarity(x.flatten().float(), y.flatten().float(), dim=0).item()
                for x, y in zip(a, b)]

    ours, ckpt, theirs = results["ours"], results["ours_checkpointing"], results["transformers"]
    cos = cosines(ours[1], theirs[1])
    return {"model": layout, "seq": seq, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "forward": forward.path, "loss_ours": ours[0], "loss_transformers": theirs[0],
            "loss_rel_diff": abs(ours[0] - theirs[0]) / abs(theirs[0]), "grad_cosine_min": min(cos),
            "grad_cosine_mean": sum(cos) / len(cos), "checkpointing_loss_diff": abs(ckpt[0] - ours[0]),
            "checkpointing_grad_max_diff": max((x - y).abs().max().item() for x, y in zip(ours[1], ckpt[1]))}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    try:
        row = row_for(spec)
    except Exception as exc:  # noqa: BLE001 - a failed row is a row with its error
        import torch

        text = "OOM" if "out of memory" in str(exc).lower() else f"{type(exc).__name__}: {str(exc)[:400]}"
        row = {**spec, "error": text}
        if torch.cuda.is_available():
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print("ROW " + json.dumps(row), flush=True)
