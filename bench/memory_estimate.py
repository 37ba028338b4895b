"""The memory estimate (engine/memory) against the measured training peak, on one GPU.

    python -m bench.memory_estimate                  # SD1.5 and SDXL, every row: about 3-4 minutes on an H100
    python -m bench.memory_estimate sd15 --quick     # batch 1 rows of one model only
    python -m bench.memory_estimate flux1            # Flux.1-dev: ours, fp8_base and fp8_compute rows
    python -m bench.memory_estimate flux1 --batch 4  # only the rows at batch 4

Full-size SD1.5 (512), SDXL (1024) and Flux.1-dev (1024, cached latents and text as bench.ours trains
it, workload_flux.py) with random weights, rank 16, bf16, AdamW, the engine's default step (CUDA graph).
SD: batch 1/4/8 with gradient checkpointing off and on from cached latents, batch 4 with latents encoded
every step, and `fp8_base` (UNet weights stored in fp8) last. Flux: batch 1 and 4 with checkpointing off
and on, bf16 weights, `fp8_compute` on them, then `fp8_base` and `fp8_compute` on its fp8 weights. A row
whose estimate is above the card's whole memory is skipped (Flux at batch 4 without checkpointing needs
about 97-119 GiB: an H200 runs it, an H100 does not); a row that ran out of memory and finished through
the engine's recovery (checkpointing turned on, the batch split) is marked so and not compared.
Each row trains 3 steps (the first of a bucket runs eagerly, the second captures the graph, the third
replays it) and measures `torch.cuda.max_memory_allocated()` from the run's start event (after caching,
weights, LoRA, fp8_compute's fp8 copy and parked encoders in place) to its last step, as bench/ours.py
does. The estimate is what the trainer's start message says (engine/memory/run.py: the loaded model's
weights on the device, the run's shape), made here from the same model before the run. A row passes
when the estimate is within 10% of the peak and never more than 5% under it. Ends with a Markdown table
for bench/README.md. `BENCH_SMOKE_RES=64` runs every row on the CPU with tiny images (and a tiny Flux):
no peak to compare, fp8_compute through torch's CPU fp8 product.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .common import SMOKE_RES, WORKLOADS, Config, log, reset_memory
from .ours import build_model, recovery_notes, run_config

# (batch, checkpointing, cached latents, fp8_base, fp8_compute)
ROWS = [(1, False, True, False, False), (4, False, True, False, False), (8, False, True, False, False),
        (1, True, True, False, False), (4, True, True, False, False), (8, True, True, False, False),
        (4, False, False, False, False), (4, True, False, False, False),
        (1, True, True, True, False), (4, False, True, True, False)]  # fp8 rows last: the UNet stays converted
QUICK = [(1, False, True, False, False), (1, True, True, False, False), (1, True, False, False, False),
         (1, True, True, True, False)]
# Flux.1-dev: its data comes cached (workload_flux.py); fp8_compute on bf16 weights before fp8_base converts them
FLUX_ROWS = [(1, False, True, False, False), (1, True, True, False, False),
             (4, True, True, False, False), (4, False, True, False, False),
             (1, False, True, False, True), (1, True, True, False, True), (4, True, True, False, True),
             (1, False, True, True, False), (1, True, True, True, False),
             (4, True, True, True, False), (4, False, True, True, False),
             (1, False, True, True, True), (1, True, True, True, True)]


def estimate_row(model, name: str, batch: int, ckpt: bool, cached: bool, fp8_compute: bool = False):
    """The estimate as the trainer makes it at its start: the model's weights (VAE and text encoders parked
    when cached), the default LoRA's parameters for the family, the row's shape."""
    import dataclasses

    from engine.memory import RunShape, estimate, weights_of_family, weights_of_model

    w = WORKLOADS[name]
    side = (SMOKE_RES or w["resolution"]) // 8
    weights = weights_of_model(model, on_device_only=False)
    lora = weights_of_family(w["family"], precision="bf16")
    weights = dataclasses.replace(weights, lora_params=lora.lora_params)
    shape = RunShape(family=w["family"], batch_size=batch, latent_pixels=side * side, precision="bf16",
                     gradient_checkpointing=ckpt, cache_latents=cached, cache_text=True, fp8_compute=fp8_compute)
    return estimate(shape, weights)


def run(models: list[str], rows_of, batches: set[int] | None = None) -> list[dict]:
    import torch

    from engine.models import fp8_compute as fp8c
    from engine.models.fp8 import store_in_fp8

    results = []
    root = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    card = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if card is None:  # smoke runs on the CPU: fp8_compute's rows through torch's CPU fp8 product
        fp8c.ALLOW_CPU = True
    for name in models:
        rows = [r for r in rows_of(name) if batches is None or r[0] in batches]
        if not rows:
            continue
        reset_memory()
        model = build_model(Config(tool="ours", model=name, batch=1, gradient_checkpointing=False))
        if SMOKE_RES:  # CPU smoke runs: `resolution: auto` trains at the model's own size
            model.info.resolution = SMOKE_RES
        fp8_done = False
        for batch, ckpt, cached, fp8, compute in rows:
            if fp8 and not fp8_done:
                store_in_fp8(model.transformer if name == "flux1" else model.unet)
                fp8_done = True
            est = estimate_row(model, name, batch, ckpt, cached, compute)
            cfg = Config(tool="ours", model=name, batch=batch, gradient_checkpointing=ckpt, cached=cached,
                         steps=2, warmup=1)
            t0 = time.monotonic()
            reset_memory()
            measured, error, notes = None, None, []
            if card is not None and est.total > card:
                error = f"skipped: estimate above this card's {card / 2**30:.0f} GiB"
            else:
                try:
                    row = run_config(model, cfg, root, {"fp8_compute": True} if compute else None)
                    measured = row.peak_gib * 2**30 if row.peak_gib is not None else None
                    notes = recovery_notes(row.notes)
                except Exception as exc:  # noqa: BLE001 - an OOM row is a result too
                    error = f"{type(exc).__name__}: {str(exc)[:80]}"
                    notes = getattr(exc, "bench_notes", [])
                if notes:  # trained on a plan it was not configured with: its peak is not this row's
                    measured = None
                    error = (f"{error}, " if error else "") + "went through out-of-memory recovery: " + "; ".join(notes)
            result = {"model": name, "batch": batch, "checkpointing": ckpt, "cached": cached, "fp8_base": fp8,
                      "fp8_compute": compute, "estimate": est.total, "parts": est.breakdown(),
                      "measured": measured, "error": error}
            results.append(result)
            log(f"{_line(result)}  ({time.monotonic() - t0:.0f} s)")
        del model
        reset_memory()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return results


def _verdict(r: dict) -> str:
    if r["measured"] is None:
        return r["error"] or "not measured"
    ratio = r["estimate"] / r["measured"] - 1
    return f"{ratio:+.1%} " + ("ok" if -0.05 <= ratio <= 0.10 else "OFF")


def _weights(r: dict) -> str:
    return ("fp8" if r["fp8_base"] else "bf16") + (" + fp8_compute" if r.get("fp8_compute") else "")


def _line(r: dict) -> str:
    measured = f"{r['measured'] / 2**30:6.2f}" if r["measured"] is not None else "     -"
    return (f"{r['model']:5} b{r['batch']} ckpt={'on ' if r['checkpointing'] else 'off'} "
            f"{'cached  ' if r['cached'] else 'uncached'} {_weights(r):17}  "
            f"estimate {r['estimate'] / 2**30:6.2f} GiB  measured {measured} GiB  {_verdict(r)}")


def markdown(results: list[dict]) -> str:
    lines = ["| model | batch | checkpointing | latents | weights | estimate GiB | measured GiB | estimate vs measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        measured = f"{r['measured'] / 2**30:.2f}" if r["measured"] is not None else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'cached' if r['cached'] else 'encoded each step'} | {_weights(r)} | "
                     f"{r['estimate'] / 2**30:.2f} | {measured} | {_verdict(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    models = [a for a in argv if a in WORKLOADS] or ["sd15", "sdxl"]
    quick = "--quick" in argv
    batches = {int(argv[argv.index("--batch") + 1])} if "--batch" in argv else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run: no peak to compare)"
    log(f"memory estimate vs measured peak on {device}")
    def rows_of(name: str):
        if name == "flux1":
            return [r for r in FLUX_ROWS if r[0] == 1] if quick else FLUX_ROWS
        return QUICK if quick else ROWS

    results = run(models, rows_of, batches)
    print("\n".join(_line(r) for r in results))
    print()
    print(markdown(results))
    measured = [r for r in results if r["measured"] is not None]
    bad = [r for r in measured if not -0.05 <= r["estimate"] / r["measured"] - 1 <= 0.10]
    print(f"\n{len(measured) - len(bad)} of {len(measured)} measured rows within -5%/+10% "
          f"({len(results) - len(measured)} not measured)")
    return 1 if bad or not measured else 0


if __name__ == "__main__":
    sys.exit(main())
