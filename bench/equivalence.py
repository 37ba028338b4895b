"""On the GPU: the default step (CUDA graph, bf16 weights computed natively) gives the loss curve of
the plain step under autocast, as diffusers' and kohya's scripts train (same seed, bf16).

    python -m bench.equivalence [sd15|sdxl] [batch] [steps] [fp8]

For checkpointing off and on it runs the reference (plain step, `autocast: always`), the plain step
native (`autocast: auto`) and the graphed native step, and prints each curve's largest relative
difference to the reference. bf16 kernels are not bitwise reproducible across launch orders and the
native step rounds norm outputs to bf16 once more, so the bound is loose (2% per step, 0.5% on the
mean). On the CPU, tests/engine/test_fast_step.py checks the graphed step's math to 1e-5 in fp32,
and test_native_bf16.py checks which path runs (CPU autocast keeps norms in bf16, so there the two
curves are equal). With `fp8` the UNet's Linear/Conv2d weights are then stored in fp8 (what
`fp8_base: true` does) and the default step's curves are compared with the same bf16 references,
within 5% per step and 2% on the mean (fp8 e4m3 rounds each weight by up to 6%).

    python -m bench.equivalence [sd15|sdxl] [batch] [steps] fp8c [out=DIR]

`fp8c` runs only the fp8_compute check (engine/models/fp8_compute.py; give 100 steps or more): for
checkpointing off and on, the default bf16 step (CUDA graph) is the reference, `fp8_compute: true`
the candidate, and the plain bf16 step (no graph) a second bf16 run whose differences to the
reference are only kernel order: the noise floor. Pass: every step's loss within 5% of the
reference's and the mean within 2% (fp8_base's bounds), and the final LoRA's effect close to the
bf16-trained LoRA's: the UNet's output change at strength 1 (LoRA on minus LoRA off, bf16 forward,
same seeded inputs) with cosine >= 0.95 to the reference's change and relative difference <= 0.35.
The floor's numbers are printed beside. With `out=DIR` the results go to DIR/equivalence_<model>.json
and a Markdown table to DIR/equivalence_<model>.md, ready to paste.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED
from .workload import engine_model, image_folder


def curve(model, root: Path, batch: int, steps: int, gc: bool, **opts) -> list[float]:
    return run(model, root, batch, steps, gc, **opts).losses


def run(model, root: Path, batch: int, steps: int, gc: bool, **opts):
    from engine.config import TrainConfig
    from engine.train import train

    tag = "_".join(f"{k}-{v}" for k, v in opts.items())
    cfg = TrainConfig(train_data_dir=str(image_folder(root, model.info.name.split("-")[-1])),
                      output_dir=str(root / tag), output_name="eq", batch_size=batch,
                      max_train_steps=steps, lora_rank=RANK, lora_alpha=ALPHA, mixed_precision="bf16",
                      gradient_checkpointing=gc, save_every_n_epochs=0, seed=SEED,
                      learning_rate=1e-3, device="cuda", **opts)
    return train(cfg, model)


VARIANTS = {"plain native": dict(cuda_graph=False, autocast="auto"),
            "graph native": dict(cuda_graph=True, autocast="auto")}
REFERENCE = dict(cuda_graph=False, autocast="always")
BOUNDS = {"bf16": (0.02, 0.005), "fp8": (0.05, 0.02)}  # largest per-step, mean relative difference


def _compare(out: dict, key: str, label: str, ref: list[float], got: list[float], bounds) -> bool:
    rel = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(ref, got)]
    mean_rel = abs(sum(ref) - sum(got)) / max(abs(sum(ref)), 1e-8)
    good = max(rel) <= bounds[0] and mean_rel <= bounds[1]
    out[key][label] = dict(curve=got, max_rel=max(rel), mean_rel=mean_rel, within=good)
    print(f"{key} {label}: max rel diff {max(rel):.2e}, mean {mean_rel:.2e} -> {'OK' if good else 'DIFFERENT'}",
          flush=True)
    return good


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else 2
    steps = int(argv[2]) if len(argv) > 2 else 12
    root = Path(tempfile.mkdtemp(prefix="bench_eq_"))
    model = engine_model(name)
    if "fp8c" in argv[3:]:
        from .equivalence_fp8c import fp8c_main

        out_dir = next((a[len("out="):] for a in argv[3:] if a.startswith("out=")), None)
        return fp8c_main(model, name, root, batch, steps, out_dir)
    out = {}
    ok = True
    refs = {}
    for gc in (False, True):
        key = f"{name} b{batch} gc={gc}"
        refs[gc] = curve(model, root, batch, steps, gc, **REFERENCE)
        out[key] = {"reference (plain, autocast)": refs[gc]}
        for label, opts in VARIANTS.items():
            ok &= _compare(out, key, label, refs[gc], curve(model, root, batch, steps, gc, **opts), BOUNDS["bf16"])
    if "fp8" in argv[3:]:
        from engine.models.fp8 import store_in_fp8

        store_in_fp8(model.unet)
        for gc in (False, True):
            got = curve(model, root, batch, steps, gc, **VARIANTS["graph native"])
            ok &= _compare(out, f"{name} b{batch} gc={gc}", "graph, fp8 weights", refs[gc], got, BOUNDS["fp8"])
    print("EQUIVALENCE " + json.dumps(out), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
