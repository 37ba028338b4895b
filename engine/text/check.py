"""`python -m engine check --config x.yaml` for a text run: what training will make of the data.

The data is read, tokenized and packed exactly as training does it (engine/text/dataset.py), with the
base model's tokenizer only (the weights are not loaded), and the report says how many tokens there
are, which samples are longer than `max_length` and what happens to them, how full the packed rows are,
what is held out, and the steps the run will make.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .dataset import TextData, build_data
from .model import check_model_folder, load_tokenizer
from .packing import describe_long


@dataclass
class TextReport:
    cfg: object
    data: TextData

    def plan(self) -> dict:
        cfg, train = self.cfg, self.data.train
        bpe = train.batches_per_epoch()
        steps = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * bpe / cfg.gradient_accumulation_steps))
        return {"batches_per_epoch": bpe, "steps": steps, "tokens_per_step": cfg.batch_size * train.length
                * cfg.gradient_accumulation_steps}

    def to_dict(self) -> dict:
        d, train = self.data, self.data.train
        lengths = [len(s) for s in train.samples]
        return {
            "files": [str(f) for f in d.files], "samples": d.samples, "train_samples": len(train.samples),
            "heldout_samples": len(d.heldout.samples) if d.heldout else 0, "chat": d.chat,
            "tokens": train.tokens, "trained_tokens": train.trained_tokens,
            "sample_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "max_length": self.cfg.max_length, "longer_than_max_length": [[x.where, x.tokens] for x in d.fitted.long],
            "rows": len(train.rows), "row_length": train.length, "fill": round(train.fill, 4),
            **self.plan(), "warnings": d.warnings,
        }

    def to_text(self) -> str:
        r, cfg = self.to_dict(), self.cfg
        files = r["files"][0] if len(r["files"]) == 1 else f"{len(r['files'])} files"
        lines = [f"Text data: {files}: {r['samples']} samples ({r['train_samples']} to train on, "
                 f"{r['heldout_samples']} held out for perplexity){', chat' if r['chat'] else ''}",
                 f"Tokens: {r['tokens']:,} in the training samples, {r['trained_tokens']:,} of them trained "
                 f"({r['trained_tokens'] / max(1, r['tokens']):.0%}); per sample min {r['sample_tokens']['min']}, "
                 f"median {r['sample_tokens']['median']:g}, max {r['sample_tokens']['max']}"]
        long = self.data.fitted.long
        lines.append(f"Longer than max_length {cfg.max_length}: " + (
            f"{len(long)} ({cfg.long_samples}): {describe_long(long)}" if long else "none"))
        packing = "packed" if cfg.packing else "one sample a row"
        lines.append(f"Rows: {r['rows']} of {r['row_length']} tokens ({packing}, {r['fill']:.0%} real tokens)")
        lines.append(f"Plan: {r['batches_per_epoch']} batches/epoch (batch {cfg.batch_size}, accumulation "
                     f"{cfg.gradient_accumulation_steps}) -> {r['steps']} steps"
                     + ("" if cfg.max_train_steps else f" over {cfg.epochs} epochs"))
        lines += [f"warning: {w}" for w in r["warnings"]]
        return "\n".join(lines)


def check_text(cfg) -> TextReport:
    """The report for a TextConfig (paths checked; the model folder's tokenizer loaded, not its weights)."""
    cfg.check_paths()
    check_model_folder(cfg.base_model, cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    return TextReport(cfg, build_data(cfg, tokenizer))
