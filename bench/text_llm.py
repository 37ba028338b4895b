"""LLM LoRA speed and memory: ours against transformers' Trainer + PEFT and TRL's SFTTrainer.

    python -m bench.text_llm                                   # 1b and 7b, checkpointing off and on, 3 tools
    python -m bench.text_llm --models 1b,qwen2-7b --tools ours,trl-sft --checkpointing on
    python -m bench.text_llm --models 1b,7b --tools ours-compile   # ours with torch_compile: true
    python -m bench.text_llm --equivalence 1b                  # ours vs transformers in bf16 on this GPU
    python -m bench.text_llm --models tiny --steps 2 --warmup 1 --trl-python /path/to/python   # CPU smoke run

Every row is one tool on one model layout built in code with random weights (nothing is downloaded):
`1b` is Llama-3.2-1B's layout (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied embeddings,
llama3 RoPE), `7b` Llama-2-7B's (32 layers, hidden 4096, vocab 32000), `qwen2-7b` Qwen2-7B's
(28 layers, hidden 3584, GQA 28/4, qkv bias, vocab 152064). All tools train the same LoRA (rank 16,
alpha 32, dropout 0.1, q_proj/v_proj unless --targets says otherwise) in bf16 on the same rows of
--seq random tokens (batch 1 by default, each row one sample, every token trained), with fused AdamW,
constant learning rate after a 3% warm-up, gradient clipping 1.0, and gradient checkpointing off or
on (non-reentrant for the peers). Each tool runs in its own process (bench/text_llm_tools.py).
Timing as bench/common.py: after --warmup steps, each step ended by a device sync, median of --steps
steps; tokens/s = batch x seq / median step time. Peak memory is torch.cuda.max_memory_allocated from
just after the model is built (weights included) to the last timed step. One JSON line per row on
stdout (and appended to --out); a summary table with ours' ratios at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOOLS = ("ours", "hf-trainer", "trl-sft")
VARIANTS = ("ours-compile",)  # ours with torch_compile: true (compiles during the warm-up steps)
LAYOUTS = {
    "tiny": dict(kind="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
               max_position_embeddings=131072, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
    "7b": dict(kind="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-5,
               max_position_embeddings=4096),
    "qwen2-7b": dict(kind="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                     rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0, use_sliding_window=False),
}


def build_model(layout: str, device: str, dtype, seed: int = 0):
    """The layout as a transformers causal LM with random weights, built on `device` in `dtype`."""
    import torch
    import transformers

    spec = dict(LAYOUTS[layout])
    kind = spec.pop("kind")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    config = config_class(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    return model


def token_rows(layout: str, rows: int, seq: int, seed: int = 0):
    """[rows, seq] random token ids (not the special ids 0-2): the same rows for every tool."""
    import torch

    vocab = LAYOUTS[layout]["vocab_size"]
    return torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def plan(models, checkpointing, tools) -> list[dict]:
    return [dict(tool=t, model=m, gradient_checkpointing=gc) for m in models for gc in checkpointing for t in tools]


def run_row(row: dict, args) -> dict:
    """One tool on one layout, in its own process; the worker prints `ROW {json}`."""
    python = args.trl_python if row["tool"] == "trl-sft" and args.trl_python else sys.executable
    spec = {**row, "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "rank": args.rank, "dropout": args.dropout, "targets": args.targets}
    cmd = [python, "-m", "bench.text_llm_tools", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {**spec, "error": f"exit {done.returncode}: {' | '.join(tail)[:600]}"}


def summary(rows: list[dict]) -> str:
    """Markdown: tokens/s and peak GiB per tool, and ours' speed-up and memory share against each peer."""
    tools = [t for t in TOOLS[:1] + VARIANTS + TOOLS[1:] if any(r["tool"] == t for r in rows)]
    lines = ["| model | checkpointing | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for model, gc in sorted({(r["model"], r["gradient_checkpointing"]) for r in rows}, key=str):
        cells = {r["tool"]: r for r in rows if (r["model"], r["gradient_checkpointing"]) == (model, gc)}
        out = []
        for tool in tools:
            r = cells.get(tool, {})
            if not r or r.get("error"):
                out.append(f"error: {r['error'][:60]}" if r else "")
                continue
            text = f"{r['tokens_per_s']:,.0f} tok/s" + (f", {r['peak_gib']:.2f} GiB" if r.get("peak_gib") else "")
            if tool in TOOLS[1:]:
                ratios = [_ratio(cells.get(mine), r, mine) for mine in ("ours",) + VARIANTS]
                text += "".join(f" ({x})" for x in ratios if x)
            out.append(text)
        lines.append(f"| {model} | {'on' if gc else 'off'} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _ratio(mine: dict | None, peer: dict, name: str) -> str:
    if not mine or mine.get("error") or not mine.get("tokens_per_s"):
        return ""
    text = f"{name} {mine['tokens_per_s'] / peer['tokens_per_s']:.2f}x"
    if mine.get("peak_gib") and peer.get("peak_gib"):
        text += f", {mine['peak_gib'] / peer['peak_gib']:.0%} of its memory"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.text_llm", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1b,7b", help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS + VARIANTS)}")
    p.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma list of module names, or all-linear")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--trl-python", default=os.environ.get("BENCH_TRL_PYTHON", ""),
                   help="python with trl installed, when it is not this one")
    p.add_argument("--out", default=str(HERE / "text_llm_results.jsonl"))
    p.add_argument("--equivalence", metavar="MODEL", help="compare ours with transformers in bf16 and exit")
    args = p.parse_args(argv)
    if args.equivalence:
        from .text_llm_tools import equivalence

        print(json.dumps(equivalence(args.equivalence, args.seq)))
        return 0
    gcs = [{"off": False, "on": True}[x.strip()] for x in args.checkpointing.split(",")]
    rows = []
    for row in plan([m.strip() for m in args.models.split(",")], gcs, [t.strip() for t in args.tools.split(",")]):
        result = run_row(row, args)
        rows.append(result)
        print(json.dumps(result), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
