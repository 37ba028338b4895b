"""A real out-of-memory error on the GPU, recovered: SDXL at a batch the card cannot hold without
checkpointing (engine/memory/recovery.py).

    python -m bench.oom_recovery            # batch 64: about 360 GiB without checkpointing, about 45 GiB with it
    python -m bench.oom_recovery 160        # checkpointing alone is not enough on an 80 GiB card: the batch splits
    python -m bench.oom_recovery 4 --uncached --limit-gib 9
        # latents and text encoded every step (cache_latents/cache_text_encoder_outputs off) on a card held
        # to 9 GiB (torch.cuda.set_per_process_memory_fraction): checkpointing, the batch split down to
        # single images, then the third plan, caching on the CPU with the encoders parked

Full-size SDXL with random weights (bench/workload.py) at 1024, rank 16, bf16, 8 images x repeats so one
batch holds `batch` samples, 3 steps, the engine's defaults otherwise. Prints the run's start message
(with the memory estimate), every info event (the recovery's changes), the steps with their losses,
the peak memory and the `inplace_lora_recovery` metadata of the saved file. It passes when the run
finishes all its steps with the recovery recorded.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from .common import DATASET_IMAGES, SEED, log, reset_memory
from .workload import engine_model, image_folder


def main(argv=None) -> int:
    import torch

    from engine.config import TrainConfig
    from engine.events import FunctionCallback
    from engine.train import train

    argv = sys.argv[1:] if argv is None else argv
    uncached = "--uncached" in argv
    limit = float(argv[argv.index("--limit-gib") + 1]) if "--limit-gib" in argv else None
    batch = int(argv[0]) if argv and argv[0].isdigit() else 64
    root = Path(tempfile.mkdtemp(prefix="bench_oom_"))
    model = engine_model("sdxl")
    reset_memory()
    if limit is not None:  # a smaller card: allocations past the limit raise a real out-of-memory error. Set
        # after the model is built (building it under a 9 GiB cap ran out of memory before training, H100)
        log(f"loaded: {torch.cuda.memory_allocated() / 2**30:.2f} GiB; holding the process to {limit} GiB")
        torch.cuda.set_per_process_memory_fraction(limit * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    t0 = time.monotonic()

    def on_event(event):
        stamp = f"[{time.monotonic() - t0:6.1f} s]"
        if event.kind in ("start", "info", "error"):
            print(f"{stamp} {event.kind}: {event.message}", flush=True)
        elif event.kind == "step":
            print(f"{stamp} step {event.step}/{event.total_steps} loss {event.loss}", flush=True)

    cfg = TrainConfig(train_data_dir=str(image_folder(root, "sdxl")), output_dir=str(root / "out"),
                      output_name="oom", resolution="auto", batch_size=batch,
                      repeats=math.ceil(batch / DATASET_IMAGES), max_train_steps=3, lora_rank=16, lora_alpha=8,
                      mixed_precision="bf16", gradient_checkpointing=False, save_every_n_epochs=0, seed=SEED,
                      device="cuda", **(dict(cache_latents="off", cache_text_encoder_outputs="off") if uncached else {}))
    log(f"SDXL batch {batch}, gradient checkpointing off{', nothing cached' if uncached else ''}, "
        f"on {torch.cuda.get_device_name()}" + (f" held to {limit} GiB" if limit else ""))
    result = train(cfg, model, callbacks=[FunctionCallback(on_event)])
    print(f"finished {result.steps} steps; peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    recovery = result.metadata.get("inplace_lora_recovery")
    print(f"inplace_lora_recovery: {recovery}")
    ok = result.steps == 3 and bool(recovery)
    print("PASS: the run finished on the fallback plan" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
