"""What every benchmark row shares: the workloads, the step timer, peak memory, and the row format.

A row is timed the same way for every tool: after `warmup` steps, `steps` steps each ended by
`torch.cuda.synchronize()` (so a step's time is the host's and the GPU's work together, as a user
waits for it), median of the per-step times. Peak memory is `torch.cuda.max_memory_allocated` over the
whole row (model, caches and optimizer included), reset before the row's model is built.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

WORKLOADS = {
    # family, resolution, latent side, text context width, pooled width
    "sd15": dict(family="sd1", resolution=512, latent=64, context=768, pooled=0),
    "sdxl": dict(family="sdxl", resolution=1024, latent=128, context=2048, pooled=1280),
    # Flux.1-dev (workload_flux.py): 16 latent channels, T5-XXL 512 tokens (kohya's and diffusers' dev default)
    "flux1": dict(family="flux1", resolution=1024, latent=128, context=4096, pooled=768, tokens=512),
}
RANK, ALPHA = 16, 8.0
DATASET_IMAGES = 8  # >= the largest batch, so every step draws a full batch
SEED = 0
# CPU smoke runs of the scripts (no timings worth reading): BENCH_SMOKE_RES=64 shrinks the images
SMOKE_RES = int(os.environ.get("BENCH_SMOKE_RES", "0"))


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    tool: str
    model: str
    batch: int
    gradient_checkpointing: bool
    cached: bool = True
    steps: int = 20
    warmup: int = 5


@dataclass
class Row:
    tool: str
    model: str
    batch: int
    gradient_checkpointing: bool
    cached: bool
    images_per_s: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    step_ms: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    steps_timed: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class StepClock:
    """Per-step wall times, each step ended by a device sync. Call `tick()` once per finished step."""

    def __init__(self):
        import torch

        self.torch = torch
        self.stamps: list[float] = []

    def _sync(self) -> None:
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.stamps = [time.perf_counter()]

    def tick(self) -> None:
        self._sync()
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[warmup:]


def finish_row(cfg: Config, times: list[float], images_per_step: int, notes=()) -> Row:
    import torch

    row = Row(cfg.tool, cfg.model, cfg.batch, cfg.gradient_checkpointing, cfg.cached, notes=list(notes))
    row.steps_timed = len(times)
    if times:
        med = statistics.median(times)
        row.step_ms = med * 1000
        row.images_per_s = images_per_step / med
    if torch.cuda.is_available():
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    return row


def error_row(cfg: Config, exc: BaseException | str) -> Row:
    import torch

    if isinstance(exc, BaseException):
        text = "OOM" if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() \
            else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    else:
        text = exc
    row = Row(cfg.tool, cfg.model, cfg.batch, cfg.gradient_checkpointing, cfg.cached, error=text)
    if torch.cuda.is_available():
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return row


def emit(row: Row) -> None:
    """Rows go to stdout as one tagged JSON line each, so the runner can read them among logs."""
    print("BENCH_ROW " + json.dumps(row.to_dict()), flush=True)


def reset_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def parse_configs(argv: list[str]) -> list[Config]:
    """`--configs` is a JSON list of Config dicts (the runner passes them)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True)
    args = ap.parse_args(argv)
    return [Config(**c) for c in json.loads(args.configs)]


def row_args(argv: list[str], *, batch: int, gc: bool) -> tuple[str, int, bool, dict]:
    """`[sd15|sdxl] [batch] [on|off] [key=value ...]` of the breakdown tools: model, batch,
    checkpointing and extra engine config keys (true/false become booleans)."""
    model = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else batch
    gc = (argv[2] == "on") if len(argv) > 2 else gc
    extra = {}
    for kv in argv[3:]:
        k, v = kv.split("=", 1)
        extra[k] = {"true": True, "false": False}.get(v, v)
    return model, batch, gc, extra


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
