"""The LoRA Trainer node inside a real ComfyUI on the GPU, with dynamic VRAM (comfy-aimdo) as ComfyUI
leaves it by default since 0.2x, and with ComfyUI's other memory modes. One JSON summary.

For each family (SD1.5 at 512 px, SDXL at 1024 px; random full-size checkpoints written with
tests/hosts/comfyui/make_checkpoint.py) and each mode (default = dynamic VRAM, --disable-dynamic-vram,
--lowvram --disable-dynamic-vram, --novram), one ComfyUI server (tests/hosts/comfyui/server.py, no --cpu):

1. fingerprint the host model (probe node: every weight bit, requires_grad, inference flag, hooks),
2. train through the node (the example workflow's Load Checkpoint -> Load Dataset -> LoRA Trainer ->
   Save LoRA, bf16, rank 16, no previews) and read its status line (s/step, "not CUDA-graphed: ..."),
3. fingerprint again: must equal 1,
4. queue an ordinary txt2img prompt (KSampler, 20 steps) on the same checkpoint: memory management must
   still work afterwards (it succeeds; /system_stats before/after),
5. for the default mode, also the same LoRA with --disable-dynamic-vram: same seed, so the two files
   should hold (nearly) the same tensors; a large difference means weights streamed by dynamic VRAM
   were not the ones backward used.
The standalone engine (`engine.train.train` on the same checkpoint file, same settings) gives the
speed to compare with: the issue asks for the node within 10% of it.

    COMFYUI_ROOT=/path/ComfyUI-0.33 python -m bench.comfy_dynamic_vram --python /path/venv/bin/python \\
        [--families sd15,sdxl] [--steps 60] [--modes default,nodyn,lowvram,novram] [--work /tmp/dynvram]

`--python` is the ComfyUI venv (torch with CUDA, ComfyUI's requirements including comfy-aimdo, this
repository's requirements.txt); this script itself needs only the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ROOT / "tests" / "hosts" / "comfyui"
MODES = {"default": [], "nodyn": ["--disable-dynamic-vram"], "lowvram": ["--lowvram", "--disable-dynamic-vram"],
         "novram": ["--novram"]}
FAMILIES = {"sd15": 512, "sdxl": 1024}
TRAINER = {"epochs": 100, "rank": 16, "alpha": 16.0, "learning_rate": 1e-4, "batch_size": 1, "grad_accumulation": 1,
           "optimizer": "AdamW", "scheduler": "constant", "precision": "bf16", "gradient_checkpointing": False,
           "train_text_encoder": False, "preview_every_n_steps": 0, "checkpoint_every_n_steps": 0, "seed": 0}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"dynvram_{name}", HOSTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(HOSTS))
    spec.loader.exec_module(module)
    return module


def checkpoint(python: str, family: str, work: Path) -> Path:
    path = work / f"{family}_random_seed0.safetensors"
    if not path.exists():
        subprocess.run([python, str(HOSTS / "make_checkpoint.py"), str(path), "--family", family], check=True)
    return path


def train_graph(wf, ckpt: str, folder: str, size: int, steps: int, name: str) -> dict:
    g = wf.load_api(wf.STYLE)
    keep = {wf.one(g, k) for k in ("CheckpointLoaderSimple", "InplaceLoRA_LoadDataset", "InplaceLoRA_Trainer",
                                   "InplaceLoRA_SaveLoRA")}
    g = {k: v for k, v in g.items() if k in keep}
    g[wf.one(g, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = ckpt
    g[wf.one(g, "InplaceLoRA_LoadDataset")]["inputs"].update(folder=folder, resolution=str(size), buckets=False,
                                                             repeats=1)
    trainer = g[wf.one(g, "InplaceLoRA_Trainer")]["inputs"]
    trainer.update(TRAINER, steps=steps, name=name)
    trainer.setdefault("advanced", "")
    g[wf.one(g, "InplaceLoRA_SaveLoRA")]["inputs"].update(name=f"dynvram/{name}", overwrite=True)
    return g


def txt2img_graph(wf, ckpt: str, size: int) -> dict:
    g = wf.txt2img(ckpt, "dynvram_after", prompt="a photo of a cat")
    for node in g.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=size, height=size)
        elif node["class_type"] == "KSampler":
            node["inputs"].update(steps=20, cfg=7.0)
    return g


def seconds_per_step(text: str) -> float | None:
    m = re.search(r"([0-9.]+) s/step", text)
    return float(m.group(1)) if m else None


def history_run(data, name: str) -> dict | None:
    """The node's last run (GET /inplace_lora/history: seconds_per_step to 3 decimals) named `name`."""
    if isinstance(data, dict):
        if data.get("name") == name and "seconds_per_step" in data:
            return data
        data = list(data.values())
    for item in data if isinstance(data, list) else []:
        found = history_run(item, name)
        if found:
            return found
    return None


def run_mode(srv, wf, python: str, root: str, family: str, mode: str, ckpt: Path, work: Path, steps: int) -> dict:
    size = FAMILIES[family]
    out: dict = {"family": family, "mode": mode, "args": MODES[mode]}
    server = srv.ComfyServer(python, str(work / f"base-{family}-{mode}"), extra_args=MODES[mode], root=root, cpu=False)
    srv.make_base_dir(server.base_dir)
    probe = Path(server.base_dir) / "custom_nodes" / "inplace_lora_test_probe"
    if not probe.exists():
        probe.symlink_to(HOSTS / "probe_nodes", target_is_directory=True)
    try:
        server.start(timeout=600)
        log = server.log_text()
        out["dynamic_vram"] = "DynamicVRAM support detected and enabled" in log
        out["aimdo_missing"] = "No working comfy-aimdo install detected" in log
        name = server.link_checkpoint(str(ckpt))
        wf.make_images(server.path("input", "dyn_ds"), n=8, size=size)

        def run(graph, timeout=3600):
            entry = server.wait(server.post_prompt(graph), timeout=timeout)
            ok = entry["status"]["status_str"] == "success"
            error = None if ok else json.dumps(server.status_events(entry).get("execution_error", {}))[:1500]
            return entry, ok, error

        def fingerprint():
            entry, ok, error = run(wf.fingerprint_graph(name))
            return json.loads(wf.ui_text(entry, "201")) if ok else {"error": error}

        before = fingerprint()
        stats_before = server.get_json("/system_stats")
        g = train_graph(wf, name, "dyn_ds", size, steps, f"{family}_{mode}")
        t0 = time.monotonic()
        entry, ok, error = run(g)
        out["train_seconds"] = round(time.monotonic() - t0, 1)
        out["trained"], out["train_error"] = ok, error
        if ok:
            trainer = wf.one(g, "InplaceLoRA_Trainer")
            status = wf.ui_text(entry, trainer)
            out["status_line"] = status
            run_info = history_run(server.get_json(f"/inplace_lora/history?node={trainer}"), f"{family}_{mode}")
            out["seconds_per_step"] = (run_info or {}).get("seconds_per_step") or seconds_per_step(status)
            out["cuda_graphed"] = "not CUDA-graphed" not in status
        out["host_unchanged"] = fingerprint() == before
        entry, ok, error = run(txt2img_graph(wf, name, size))
        out["prompt_after_ok"], out["prompt_after_error"] = ok, error
        out["system_stats_before"], out["system_stats_after"] = stats_before, server.get_json("/system_stats")
        lora = Path(server.path("models", "loras", "dynvram", f"{family}_{mode}.safetensors"))
        out["lora_file"] = str(lora) if lora.exists() else None
    except Exception as exc:  # a crash is a result too: keep the log tail
        out["crash"] = f"{type(exc).__name__}: {exc}"[:3000]
        out["log_tail"] = server.log_text()[-4000:]
    finally:
        server.stop()
    return out


STANDALONE = r"""
import json, sys, time
from engine.config import TrainConfig
from engine.train import train
cfg = TrainConfig(**json.loads(sys.argv[1]))
times = []
class Timer:
    def on_event(self, event):
        if event.kind == "step":
            times.append((event.step, time.monotonic()))
    def should_stop(self):
        return False
result = train(cfg, callbacks=[Timer()])
(s0, t0), (s1, t1) = times[0], times[-1]
print("RESULT " + json.dumps({"seconds_per_step": (t1 - t0) / (s1 - s0), "lora": str(result.lora_path)}))
"""


def standalone(python: str, family: str, ckpt: Path, work: Path, steps: int) -> dict:
    data = work / f"standalone-{family}-data"
    wf = sys.modules["dynvram_comfy_workflows"]
    wf.make_images(str(data), n=8, size=FAMILIES[family])
    cfg = {"base_model": str(ckpt), "train_data_dir": str(data), "output_dir": str(work / "standalone"),
           "output_name": f"{family}_standalone", "resolution": str(FAMILIES[family]), "max_train_steps": steps,
           "lora_rank": 16, "lora_alpha": 16.0, "learning_rate": 1e-4, "batch_size": 1, "lr_scheduler": "constant",
           "mixed_precision": "bf16", "gradient_checkpointing": False, "save_every_n_epochs": 0, "seed": 0}
    proc = subprocess.run([python, "-c", STANDALONE, json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(line[len("RESULT "):])


def lora_difference(python: str, a: str | None, b: str | None) -> dict | None:
    """Largest relative difference between two LoRA files' tensors (same seed, same data)."""
    if not a or not b:
        return None
    code = ("import sys, json; from safetensors.torch import load_file; x, y = load_file(sys.argv[1]), "
            "load_file(sys.argv[2]); d = max(((x[k].float() - y[k].float()).abs().max() / "
            "(y[k].float().abs().max() + 1e-12)).item() for k in x if k.endswith('weight')); "
            "print(json.dumps({'keys_equal': set(x) == set(y), 'max_rel_diff': d}))")
    proc = subprocess.run([python, "-c", code, a, b], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-1000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="the ComfyUI venv's python (CUDA torch, comfy-aimdo)")
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--modes", default="default,nodyn,lowvram,novram")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="/tmp/inplace-lora-dynvram")
    args = ap.parse_args(argv)
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        ap.error("set COMFYUI_ROOT to the ComfyUI 0.33 folder")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    srv, wf = _load("server"), _load("comfy_workflows")
    summary = {"comfyui_root": root, "rows": [], "standalone": {}, "checks": {}}
    for family in args.families.split(","):
        ckpt = checkpoint(args.python, family, work)
        rows = {mode: run_mode(srv, wf, args.python, root, family, mode, ckpt, work, args.steps)
                for mode in args.modes.split(",")}
        summary["rows"] += list(rows.values())
        alone = standalone(args.python, family, ckpt, work, args.steps)
        summary["standalone"][family] = alone
        default = rows.get("default", {})
        node, ref = default.get("seconds_per_step"), alone.get("seconds_per_step")
        summary["checks"][family] = {
            "dynamic_vram_was_on": default.get("dynamic_vram"),
            "trained": default.get("trained"), "host_unchanged": default.get("host_unchanged"),
            "prompt_after_ok": default.get("prompt_after_ok"), "cuda_graphed": default.get("cuda_graphed"),
            "node_over_standalone": round(node / ref, 3) if node and ref else None,
            "within_10_percent": bool(node and ref and node <= 1.10 * ref),
            "dynamic_vs_legacy_lora": lora_difference(args.python, default.get("lora_file"),
                                                      rows.get("nodyn", {}).get("lora_file")),
            "low_memory_modes": {m: ("trained" if r.get("trained") else r.get("train_error") or r.get("crash"))
                                 for m, r in rows.items() if m in ("lowvram", "novram")},
        }
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
