"""Do `torch_compile` runs keep compiling, and give their memory back, when many train in one process?

    python -m bench.compile_session [RUNS] [--max-graphs N]

A ComfyUI or WebUI session trains run after run in one process. This trains RUNS (default 4) short
`torch_compile: true` runs of the CPU tests' tiny SD1.5 one after another, with LoRA ranks 4, 8, 16, ...
(each rank another graph), and prints one JSON line per run: the graphs Dynamo compiled in it
(`torch._dynamo.utils.counters`), its CUDA-graph steps, the graphs left on `TrainingStep.plain_loss`'s
shared code object, and the GPU memory still allocated after the run and a garbage collection. Each run
should compile its own graph (graphs >= 1, shared_code_graphs 0) and the memory after should stay
flat. `--max-graphs 1` lowers `compiled_loss.MAX_GRAPHS` as if each run had filled all its shapes: a
build whose runs share one code object trains the second run on uncompiled (graphs 0). On a CPU it
compiles with the aot_eager backend and without CUDA graphs (engine/compiled_loss.py says why).
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path


def _images(folder: Path, n: int = 4, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"noise {i}", encoding="utf-8")
    return folder


def main(argv: list[str]) -> None:
    import torch

    import engine.compiled_loss as compiled_loss
    from engine.config import TrainConfig
    from engine.models import tiny_sd1
    from engine.options import EngineOptions
    from engine.step import TrainingStep
    from engine.train import train

    runs = int(argv[0]) if argv and not argv[0].startswith("--") else 4
    if "--max-graphs" in argv:
        compiled_loss.MAX_GRAPHS = int(argv[argv.index("--max-graphs") + 1])
    cuda = torch.cuda.is_available()
    options = EngineOptions() if cuda else EngineOptions(compile_backend="aot_eager", compile_devices=("cpu",),
                                                         fast_step_without_graph=True)
    root = Path(tempfile.mkdtemp())
    data = _images(root / "data")
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
    for i in range(runs):
        rank = 4 * 2 ** (i % 3)
        torch._dynamo.utils.counters.clear()
        cfg = TrainConfig(train_data_dir=str(data), output_dir=str(root / f"run{i}"), output_name="lora",
                          resolution="64", batch_size=2, max_train_steps=4, lora_rank=rank, learning_rate=1e-3,
                          save_every_n_epochs=0, torch_compile=True, mixed_precision="bf16" if cuda else "no")
        result = train(cfg, tiny_sd1(), options=options)
        gc.collect()
        print(json.dumps({"run": i, "rank": rank, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                          "fast_steps": result.fast_steps,
                          "shared_code_graphs": len(entries(TrainingStep.plain_loss.__code__)),
                          "allocated_mib_after": round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else None}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
