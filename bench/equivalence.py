"""On the GPU: the CUDA-graphed step gives the plain step's loss curve (same seed, bf16).

    python -m bench.equivalence [sd15|sdxl] [batch] [steps]

Prints both curves and the largest relative difference. bf16 kernels are not bitwise reproducible
across launch orders, so the bound is loose (2% per step, 0.5% on the mean); the CPU test
(tests/engine/test_fast_step.py) checks the same step bit-for-bit-ish (1e-5) in fp32.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED
from .workload import engine_model, image_folder


def curve(model, root: Path, batch: int, steps: int, graph: bool, gc: bool) -> list[float]:
    from engine.config import TrainConfig
    from engine.train import train

    cfg = TrainConfig(train_data_dir=str(image_folder(root, model.info.name.split("-")[-1])),
                      output_dir=str(root / ("g" if graph else "p")), output_name="eq", batch_size=batch,
                      max_train_steps=steps, lora_rank=RANK, lora_alpha=ALPHA, mixed_precision="bf16",
                      gradient_checkpointing=gc, save_every_n_epochs=0, seed=SEED, cuda_graph=graph,
                      learning_rate=1e-3, device="cuda")
    return train(cfg, model).losses


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else 2
    steps = int(argv[2]) if len(argv) > 2 else 12
    root = Path(tempfile.mkdtemp(prefix="bench_eq_"))
    model = engine_model(name)
    out = {}
    ok = True
    for gc in (False, True):
        plain = curve(model, root, batch, steps, False, gc)
        graph = curve(model, root, batch, steps, True, gc)
        rel = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(plain, graph)]
        mean_rel = abs(sum(plain) - sum(graph)) / max(abs(sum(plain)), 1e-8)
        good = max(rel) <= 0.02 and mean_rel <= 0.005
        ok &= good
        out[f"gc={gc}"] = dict(plain=plain, graph=graph, max_rel=max(rel), mean_rel=mean_rel, within=good)
        print(f"{name} b{batch} gc={gc}: max rel diff {max(rel):.2e}, mean {mean_rel:.2e} -> "
              f"{'OK' if good else 'DIFFERENT'}", flush=True)
    print("EQUIVALENCE " + json.dumps(out), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
