"""On real GPUs (NCCL): N GPUs with batch B train the LoRA one GPU trains with batch N x B? The CPU test
(tests/engine/test_distributed.py, gloo) proves it to float32 rounding; this repeats it on the GPUs with
the built-in demo model, in fp32 (TF32 off) so the bound stays tight.

    python -m bench.multi_gpu_same                 # 2 GPUs, torchrun and accelerate
    python -m bench.multi_gpu_same --gpus 4

Prints one JSON line per launcher: the largest LoRA difference against the one-GPU run and the
largest LoRA entry (the CPU test's bound is 1e-4 for 1e-3 learning rate; expect the same order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .multi_gpu_failure import REPO, demo_config, launch_line

BATCH, STEPS = 2, 30


def config(root: Path, name: str, batch: int) -> Path:
    return demo_config(root / f"{name}.yaml", output_dir=root, output_name=name, batch_size=batch,
                       max_train_steps=STEPS, mixed_precision="'no'", cuda_graph="false", save_precision="fp32")


def lora(root: Path, name: str):
    from safetensors.torch import load_file

    return load_file(str(root / name / f"{name}.safetensors"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--launchers", default="torchrun,accelerate")
    ap.add_argument("--work", default="/tmp/bench_multi_gpu_same")
    args = ap.parse_args(argv)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    env = {"NVIDIA_TF32_OVERRIDE": "0"}
    import os

    env = {**os.environ, **env}
    one = subprocess.run([sys.executable, "-m", "engine", "train", "--config",
                          str(config(root, "one", BATCH * args.gpus))], cwd=REPO, env=env, capture_output=True, text=True)
    if one.returncode:
        sys.exit(one.stderr[-2000:])
    reference = lora(root, "one")
    for launcher in args.launchers.split(","):
        run = subprocess.run(launch_line(launcher, args.gpus, config(root, launcher, BATCH)), cwd=REPO, env=env,
                             capture_output=True, text=True)
        if run.returncode:
            print(json.dumps({"launcher": launcher, "error": (run.stdout + run.stderr)[-2000:]}), flush=True)
            continue
        several = lora(root, launcher)
        diff = max((several[k] - v).abs().max().item() for k, v in reference.items())
        print(json.dumps({"launcher": launcher, "gpus": args.gpus, "steps": STEPS, "max_lora_difference": diff,
                          "largest_lora_entry": max(v.abs().max().item() for k, v in reference.items() if k.endswith("weight")),
                          "bound": 1e-4, "same": diff < 1e-4}), flush=True)


if __name__ == "__main__":
    main()
