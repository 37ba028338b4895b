"""On the GPU: a run's loss curve and saved LoRA as digests, to compare two commits bit for bit.

    python -m bench.curve_digest [sd15|sdxl] [batch] [steps] [key=value ...]   (e.g. gradient_checkpointing=true)

Trains the benchmark's random full-size model (bench/workload.py, the same weights for a seed) with the
engine's defaults (CUDA-graphed step, bf16) plus any config keys given, and prints one JSON line: each
step's loss as a float hex and a sha256 over every saved tensor. The family/objective/step redesign
(issue 15) must not change either; run it on both commits on the same machine and compare the lines
(bf16 kernels are deterministic for the same launch sequence on one GPU and driver). To run it on a
commit that predates this file, copy it there (`git show i15-redesign:bench/curve_digest.py >
bench/curve_digest.py`): it uses only `engine.train.train`, which both have.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED, row_args
from .workload import engine_model, image_folder


def main(argv=None) -> dict:
    import torch

    from engine.config import TrainConfig
    from engine.train import train

    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "sd15"
    batch = int(argv[1]) if len(argv) > 1 else 8
    steps = int(argv[2]) if len(argv) > 2 else 20
    extra = row_args([name, str(batch), "off", *argv[3:]], batch=batch, gc=False)[3]  # key=value config keys

    root = Path(tempfile.mkdtemp(prefix="bench_digest_"))
    cfg = TrainConfig(train_data_dir=str(image_folder(root, name)), output_dir=str(root / "out"), output_name="digest",
                      resolution="auto", batch_size=batch, max_train_steps=steps, lora_rank=RANK, lora_alpha=ALPHA,
                      mixed_precision="bf16", save_every_n_epochs=0, save_precision="fp32", seed=SEED, device="cuda",
                      **extra)
    result = train(cfg, engine_model(name))
    h = hashlib.sha256()
    for key in sorted(result.tensors):
        t = result.tensors[key].detach().cpu().contiguous()
        h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    out = {"model": name, "batch": batch, "steps": steps, "extra": extra,
           "losses": [float(x).hex() for x in result.losses], "lora_sha256": h.hexdigest()}
    print("DIGEST " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
