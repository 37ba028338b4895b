"""A process of a several-GPU run is killed: do the others end within a minute, saying why, with a
checkpoint the run resumes from (on NCCL, under the real launchers)? tests/engine/test_distributed.py
proves it on the CPU (gloo); this is the GPU check, with the built-in demo model (seconds per run).

    python -m bench.multi_gpu_failure                      # torchrun and accelerate, 2 GPUs
    python -m bench.multi_gpu_failure --gpus 4 --launchers torchrun

For each launcher: start `-m engine train` on N GPUs (save_steps 10, --steps 400), SIGKILL the rank-1
process once the step-20 checkpoint exists, time until the launch has ended, print the survivors' last
lines and the checkpoints, then resume on one GPU with batch_size x N and check that it finishes.
One JSON line per launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH = 2


def demo_config(path: Path, **keys) -> Path:
    """A YAML config at `path` training the built-in demo model on the demo images (beside it), plus `keys`."""
    from engine.demo import write_dataset

    base = dict(base_model=REPO / "engine/assets/demo/demo_model.safetensors", train_data_dir=write_dataset(
        path.parent / "data"), resolution=64, save_every_n_epochs=0, learning_rate=0.001, overwrite="true")
    path.write_text("".join(f"{k}: {v}\n" for k, v in {**base, **keys}.items()), encoding="utf-8")
    return path


def write_config(root: Path, launcher: str, steps: int) -> Path:
    return demo_config(root / f"{launcher}.yaml", output_dir=root / launcher, output_name="lost", batch_size=BATCH,
                       max_train_steps=steps, save_steps=10)


def launch_line(launcher: str, gpus: int, cfg: Path) -> list[str]:
    tail = ["-m", "engine", "train", "--config", str(cfg)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *tail]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *tail]


def rank_pid(root_pid: int, rank: int) -> int | None:
    """The worker with RANK=rank among root_pid's descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                status = (proc / "status").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))

    def descends(pid: int) -> bool:
        while pid in parents and pid != root_pid:
            pid = parents[pid]
        return pid == root_pid

    for pid in parents:
        if pid == root_pid or not descends(pid):
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def one(launcher: str, gpus: int, root: Path, steps: int) -> dict:
    cfg = write_config(root, launcher, steps)
    ckpts = root / launcher / "lost" / "checkpoints"
    log = open(root / f"{launcher}.log", "w")
    run = subprocess.Popen(launch_line(launcher, gpus, cfg), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (ckpts / "step-00000020").is_dir():
        if run.poll() is not None or time.monotonic() > deadline:
            return {"launcher": launcher, "error": "no step-20 checkpoint", "log": (root / f"{launcher}.log").read_text()[-2000:]}
        time.sleep(0.2)
    victim = rank_pid(run.pid, 1)
    if victim is None:
        run.kill()
        return {"launcher": launcher, "error": "rank 1 not found"}
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    try:
        code = run.wait(timeout=180)
    except subprocess.TimeoutExpired:
        run.kill()
        code = "hung > 180 s"
    ended = time.monotonic() - killed
    log.close()
    text = (root / f"{launcher}.log").read_text()
    lines = [ln for ln in text.splitlines() if "error:" in ln or "stopped" in ln or "another process" in ln]
    found = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    resume = subprocess.run([sys.executable, "-m", "engine", "train", "--config", str(cfg), "--set",
                             "resume_from_checkpoint=latest", "--set", f"batch_size={BATCH * gpus}"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    return {"launcher": launcher, "gpus": gpus, "seconds_to_end_after_kill": round(ended, 1), "exit_code": code,
            "within_a_minute": ended < 60, "messages": lines[-6:], "checkpoints": found,
            "resumed_on_one_gpu": resume.returncode == 0,
            "resume_tail": (resume.stdout + resume.stderr).strip().splitlines()[-3:]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--launchers", default="torchrun,accelerate")
    ap.add_argument("--steps", type=int, default=400, help="the run's max_train_steps (the kill comes after 20)")
    ap.add_argument("--work", default="/tmp/bench_multi_gpu_failure")
    args = ap.parse_args(argv)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    for launcher in args.launchers.split(","):
        print(json.dumps(one(launcher, args.gpus, root, args.steps)), flush=True)


if __name__ == "__main__":
    main()
