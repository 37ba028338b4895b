"""Where our peak GPU memory goes: the tensors alive at the peak of a short training run, by origin.

    python -m bench.memory_breakdown [sd15|sdxl] [batch] [on|off] [key=value ...]

Runs the engine as `bench.ours` does (extra config keys after the row, e.g. `cuda_graph=false`) with
PyTorch's allocator history on, replays the history to the moment of the highest allocated total,
and prints the live bytes grouped by the innermost Python frame from the engine, diffusers or
torch.nn that allocated them. For finding what to cut, not a benchmark row.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

from .common import Config, env_flag, reset_memory, row_args
from .ours import run_config
from .workload import engine_model

KEEP = ("/engine/", "/diffusers/", "/torch/nn/", "/torch/optim/", "/torch/utils/checkpoint", "/bench/")


def _where(f) -> str:
    return f"{f.get('filename', '').split('/site-packages/')[-1].split('/main/')[-1]}:{f.get('line')} {f.get('name')}"


def _origin(frames) -> str:
    """The innermost frame from KEEP, and the engine/diffusers frame that called into it."""
    frames = list(frames or [])
    for i, f in enumerate(frames):
        if any(k in f.get("filename", "") for k in KEEP):
            caller = next((g for g in frames[i + 1:] if "/diffusers/" in g.get("filename", "")
                           or "/engine/" in g.get("filename", "")), None)
            return _where(f) + (f" <- {_where(caller)}" if caller is not None else "")
    return "(no python frame: cuBLAS/cuDNN workspace or allocator internals)"


def live_now(snapshot) -> dict[str, int]:
    """Bytes allocated right now, grouped by origin (blocks carry their frames while history is on)."""
    groups: dict[str, int] = collections.Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                groups[_origin(block.get("frames"))] += block["size"]
    return groups


def _print_groups(groups: dict[str, int], limit: int) -> None:
    for origin, size in sorted(groups.items(), key=lambda kv: -kv[1])[:limit]:
        print(f"  {size / 2**20:9.1f} MiB  {origin}")


def live_at_peak(trace, resident: dict[int, int] | None = None) -> tuple[int, dict[str, int]]:
    """The peak of the bytes allocated since the loop started, net of the resident blocks freed since
    (`resident`: address -> size at the start, e.g. a cuBLAS workspace dropped at the first warm-up),
    and what was alive at that peak, grouped by origin."""
    live: dict[int, tuple[int, str]] = {}
    resident = dict(resident or {})
    total = peak = 0
    best: dict[int, tuple[int, str]] = {}
    freed_resident = 0
    for ev in trace:
        action, addr, size = ev.get("action"), ev.get("addr"), ev.get("size", 0)
        if action == "alloc":
            live[addr] = (size, _origin(ev.get("frames")))
            total += size
            if total > peak:
                peak, best = total, dict(live)
                if freed_resident:
                    best[-1] = (-freed_resident, "(resident blocks freed before this peak)")
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
        elif action == "free_requested" and addr in resident:
            size = resident.pop(addr)
            total -= size
            freed_resident += size
    groups: dict[str, int] = collections.Counter()
    for size, origin in best.values():
        groups[origin] += size
    return peak, groups


def _addresses(snapshot) -> dict[int, int]:
    return {block["address"]: block["size"] for segment in snapshot["segments"] for block in segment["blocks"]
            if block["state"] == "active_allocated" and "address" in block}


def main(argv=None) -> int:
    import torch

    model_name, batch, gc, extra = row_args(sys.argv[1:] if argv is None else argv, batch=1, gc=True)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")  # before the model
    model = engine_model(model_name)
    cfg = Config("ours", model_name, batch, gc, steps=3, warmup=3)
    reset_memory()
    start = []

    def on_start():  # after caching, optimizer and parking: what is allocated now stays for the run
        start.append(torch.cuda.memory._snapshot())

    snaps = []
    row = run_config(model, cfg, Path(tempfile.mkdtemp(prefix="bench_mem_")), extra, on_start=on_start,
                     on_last_step=lambda: snaps.append(torch.cuda.memory._snapshot()))
    torch.cuda.memory._record_memory_history(enabled=None)
    resident = live_now(start[0])
    # first step to last (the end of the run apart): the events after the loop started
    peak, groups = live_at_peak(snaps[0]["device_traces"][0][len(start[0]["device_traces"][0]):],
                                _addresses(start[0]))
    print(f"{model_name} b{batch} gc={'on' if gc else 'off'} {extra}: training peak {row.peak_gib:.3f} GiB = "
          f"{sum(resident.values()) / 2**30:.3f} GiB resident when the loop starts + "
          f"{peak / 2**30:.3f} GiB allocated by the steps at their peak (net of resident blocks freed "
          f"before it).\nResident:")
    _print_groups(resident, 12)
    if env_flag("BENCH_STACKS"):  # the whole allocation stack of resident blocks outside weights and LoRA
        for segment in start[0]["segments"]:
            for block in segment["blocks"]:
                frames = block.get("frames") or []
                if block["state"] == "active_allocated" and block["size"] >= 2**20 and not any(
                        "module.py" in f.get("filename", "") and f.get("name") == "convert" for f in frames):
                    print(f"  block {block['size'] / 2**20:.1f} MiB:")
                    for f in frames[:40]:
                        if "/torch/" not in f.get("filename", "") or "/nn/" in f.get("filename", ""):
                            print(f"      {_where(f)}")
    print("Allocated by the steps, alive at their peak:")
    _print_groups(groups, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
