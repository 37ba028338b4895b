"""Images/s on 1, 2, 4 and 8 GPUs of one machine: SD1.5 and SDXL at batch 8 per GPU, gradient
checkpointing off and on, our engine and kohya sd-scripts under the same `accelerate launch`.

    python -m bench.multi_gpu                                  # every GPU count this machine has
    python -m bench.multi_gpu --gpus 1,2 --models sd15 --steps 10 --warmup 3
    KOHYA_DIR=/path/to/sd-scripts python -m bench.multi_gpu    # kohya rows too
    python -m bench.multi_gpu --dry-run                        # the launch lines only

Each (GPU count, model, tool) is one launch: `accelerate launch --multi_gpu --num_processes N -m bench.multi_gpu
--worker ...` (`--launcher torchrun` uses `torchrun --standalone --nproc_per_node N`; one GPU runs
plainly), whose processes build the same random full-size model (bench/workload.py: real layouts, one
seed, no download) and train on the benchmark's images for both checkpointing settings. The rows are
bench/common.py's: median step time after the warm-up, timed on the first process; images/s here is
the global batch (8 x N) over it. "ours-eager" (the plain step, `cuda_graph: false`) is the one-GPU
baseline of the several-GPU rows, which run the plain step (the CUDA graph does not hold the
all-reduce yet); "ours" on one GPU is the default, graphed step. The table gives each row's scaling
against N times the same tool's one-GPU rate (the issue's target: at least 0.9).
Results go to --out (JSON lines of rows) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BATCH = 8


def launch_line(launcher: str, processes: int, worker_args: list[str]) -> list[str]:
    """The command that starts `processes` workers (the same lines a user trains with, see README)."""
    tail = ["-m", "bench.multi_gpu", "--worker", *worker_args]
    if processes == 1:
        return [sys.executable, *tail]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *tail]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *tail]


def worker(tool: str, configs: list[dict], processes: int) -> None:
    """One process of a launch: the row runners of bench/ours.py and bench/peer_kohya.py, unchanged,
    on this process's GPU; the dataset repeats so every global batch is full."""
    import torch

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if tool == "kohya":
        from . import peer_kohya

        peer_kohya.main(["--configs", json.dumps(configs)])
        return
    from . import ours
    from .common import parse_configs

    extra = {"repeats": max(1, BATCH * processes), **({"cuda_graph": False} if tool == "ours-eager" else {})}
    ours.run_rows(parse_configs(["--configs", json.dumps(configs)]), ours.build_model,
                  lambda model, cfg, root: ours.run_config(model, cfg, root, extra), prefix="bench_multi_")


def run_launch(launcher: str, processes: int, tool: str, model: str, args) -> list[dict]:
    configs = [dict(tool=tool, model=model, batch=BATCH, gradient_checkpointing=gc, steps=args.steps, warmup=args.warmup)
               for gc in (False, True)]
    line = launch_line(launcher, processes, [tool, "--configs", json.dumps(configs), "--processes", str(processes)])
    print("$ " + shlex.join(line), file=sys.stderr, flush=True)
    if args.dry_run:
        return []
    started = time.monotonic()
    try:
        done = subprocess.run(line, capture_output=True, text=True, timeout=args.timeout)
        output, failed = done.stdout + done.stderr, done.returncode != 0 and f"exit code {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        output, failed = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    rows = {}
    for text in output.splitlines():
        if text.startswith("BENCH_ROW "):
            row = json.loads(text[len("BENCH_ROW "):])
            key = row["gradient_checkpointing"]
            if row.get("images_per_s") is not None or key not in rows:  # the first process's timed row
                rows[key] = row
    out = []
    for gc in (False, True):
        row = rows.get(gc) or dict(tool=tool, model=model, batch=BATCH, gradient_checkpointing=gc,
                                   error=failed or "no row", images_per_s=None)
        row.update(gpus=processes, launcher=launcher if processes > 1 else "none",
                   seconds=round(time.monotonic() - started, 1))
        if row.get("images_per_s") is not None:
            row["images_per_s"] *= processes  # the global batch per step
        out.append(row)
    if failed:
        print(output[-3000:], file=sys.stderr)
    return out


def table(rows: list[dict]) -> str:
    base = {(r["tool"], r["model"], r["gradient_checkpointing"]): r["images_per_s"]
            for r in rows if r["gpus"] == 1}
    lines = ["| model | ckpt | tool | GPUs | images/s | scaling vs N x 1 GPU | note |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["gradient_checkpointing"], r["tool"], r["gpus"])):
        ips = r.get("images_per_s")
        # the several-GPU rows run the plain step: their one-GPU reference is ours-eager (and ours)
        ref = base.get(("ours-eager" if r["tool"] == "ours" and r["gpus"] > 1 else r["tool"], r["model"],
                        r["gradient_checkpointing"]))
        scaling = f"{ips / (r['gpus'] * ref):.2f}" if ips and ref else ""
        lines.append(f"| {r['model']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['tool']} | {r['gpus']} | "
                     f"{ips:.1f} | {scaling} | {r.get('error') or ''} |" if ips else
                     f"| {r['model']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['tool']} | {r['gpus']} | "
                     f"- | | {r.get('error') or ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("tool")
        ap.add_argument("--configs", required=True)
        ap.add_argument("--processes", type=int, default=1)
        a = ap.parse_args(argv[1:])
        worker(a.tool, json.loads(a.configs), a.processes)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="", help="GPU counts, e.g. 1,2,4,8 (default: 1, 2, 4, 8 up to this machine's)")
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--launcher", choices=("accelerate", "torchrun"), default="accelerate")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--out", default="bench/multi_gpu_results.jsonl")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.gpus:
        counts = [int(n) for n in args.gpus.split(",")]
    else:
        import torch

        have = torch.cuda.device_count()
        counts = [n for n in (1, 2, 4, 8) if n <= have] or [1]
    tools = ["ours", "ours-eager"] + (["kohya"] if os.environ.get("KOHYA_DIR") else [])
    rows: list[dict] = []
    for model in args.models.split(","):
        for n in counts:
            for tool in tools:
                if tool == "ours-eager" and n > 1:
                    continue  # several GPUs run the plain step already: "ours" is that row
                rows += run_launch(args.launcher, n, tool, model, args)
    if args.dry_run:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
