"""Check the extension inside a running A1111 WebUI (v1.10.x) over HTTP; see tests/hosts/README.md.

    python tests/a1111/live_check.py --url http://127.0.0.1:7861 --dataset DIR [--stop-test]

It trains a few steps through POST /inplace-lora/v1/train, then checks what a user would:
- the file is in the Lora folder, listed by /sdapi/v1/loras, with SD1/SD2/SDXL metadata;
- txt2img with <lora:NAME:0.8> reports "Lora hashes: NAME: <12 hex>" equal to the file's
  sshs_model_hash and to the sha256 of the file's tensor bytes (what A1111 computes itself);
- the image differs from the same seed at strength 0, which equals the no-LoRA image;
- the no-LoRA image is pixel-identical before and after training (the model was left as it was);
- with --stop-test: a second run interrupted through /sdapi/v1/interrupt ends "stopped", keeps the
  LoRA of its last step in the Lora folder with a card image, and says how to resume; the same request
  with "resume": true then continues it from that step to the end (under the WebUI's safe loading,
  which is on unless it was started with --disable-safe-unpickle), and the model is left unchanged.
Prints one JSON report; exits 1 if any check fails. Needs Pillow and numpy (the WebUI's venv has both).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


AUTH: dict[str, str] = {}


def call(url: str, path: str, body: dict | None = None, timeout: float = 900) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **AUTH},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return json.load(res)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None


def txt2img(url: str, prompt: str):
    """(sha256 of the pixels, infotext, pixels) for a fixed small generation."""
    import numpy as np
    from PIL import Image

    res = call(url, "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 1234, "steps": 2, "width": 64, "height": 64,
                                         "cfg_scale": 7, "sampler_name": "Euler", "send_images": True,
                                         "save_images": False})
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB"))
    return hashlib.sha256(pixels.tobytes()).hexdigest()[:16], json.loads(res["info"])["infotexts"][0], pixels


def tensor_bytes_sha256(path: Path) -> str:
    """A1111's own LoRA hash: sha256 of everything after the safetensors header."""
    with open(path, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header)
        return hashlib.sha256(fh.read()).hexdigest()


def wait(url: str, limit: float) -> dict:
    deadline = time.time() + limit
    while time.time() < deadline:
        status = call(url, "/inplace-lora/v1/status")
        if not status.get("running"):
            return status
        time.sleep(2)
    raise SystemExit(f"training did not finish within {limit:.0f} s")


def train_request(dataset: str, name: str, steps: int, **extra) -> dict:
    return {"train_data_dir": dataset, "output_name": name, "resolution": "64", "max_train_steps": steps,
            "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2, "train_text_encoder": True,
            "gradient_checkpointing": True, "save_every_n_epochs": 0, "preview_strengths": [0, 0.8],
            "preview_steps": 2, "preview_width": 64, "preview_height": 64, **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--dataset", required=True, help="a folder of images with .txt captions")
    ap.add_argument("--name", default="livecheck")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--stop-test", action="store_true", help="also interrupt a run and check what is kept")
    ap.add_argument("--auth", default="", help="user:password when the WebUI runs with --api-auth")
    args = ap.parse_args()
    if args.auth:
        AUTH["Authorization"] = "Basic " + base64.b64encode(args.auth.encode()).decode()
    prompt = "a photo of a cat"
    report: dict = {"checks": {}}
    checks = report["checks"]

    if args.auth:  # the trainer's routes ask for the same credentials as /sdapi/v1
        anonymous = urllib.request.Request(args.url + "/inplace-lora/v1/status")
        try:
            urllib.request.urlopen(anonymous, timeout=60)
            checks["routes_need_auth"] = False
        except urllib.error.HTTPError as exc:
            checks["routes_need_auth"] = exc.code == 401
    before = txt2img(args.url, prompt)[0]
    started = time.time()
    job = call(args.url, "/inplace-lora/v1/train", train_request(args.dataset, args.name, args.steps))
    status = wait(args.url, args.timeout)
    report["train_seconds"] = round(time.time() - started, 1)
    report["status"] = {k: status.get(k) for k in ("status", "step", "total_steps", "losses", "lora_file", "error",
                                                    "card_preview", "messages")}
    checks["trained"] = status.get("status") == "done" and status.get("step") == args.steps
    lora = Path(status.get("lora_file") or "")
    name = lora.stem
    checks["unique_name"] = name.startswith(job["lora_name"])
    if not lora.is_file():
        checks["file_written"] = False
        print(json.dumps(report, indent=1))
        return 1
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    report["sshs_model_hash"] = meta.get("sshs_model_hash")
    report["tensor_sha256"] = tensor_bytes_sha256(lora)
    report["ss_base_model_version"] = meta.get("ss_base_model_version")
    checks["hash_matches_bytes"] = report["sshs_model_hash"] == report["tensor_sha256"]
    checks["card_preview"] = bool(status.get("card_preview")) and Path(status["card_preview"]).is_file()
    listed = call(args.url, "/sdapi/v1/loras")
    checks["listed_in_loras"] = any(item.get("name") == name for item in listed)

    with_lora, info, lora_pixels = txt2img(args.url, f"{prompt} <lora:{name}:0.8>")
    at_zero, _, zero_pixels = txt2img(args.url, f"{prompt} <lora:{name}:0>")
    after = txt2img(args.url, prompt)[0]
    report["mean_abs_pixel_diff_0.8_vs_0"] = round(float(abs(lora_pixels.astype(float) - zero_pixels).mean()), 3)
    found = re.search(r'Lora hashes: "([^"]*)"', info)
    report["infotext_lora_hashes"] = found.group(1) if found else None
    report["pixels"] = {"no_lora_before": before, "no_lora_after": after, "lora_0.8": with_lora, "lora_0": at_zero}
    checks["infotext_hash"] = report["infotext_lora_hashes"] == f"{name}: {report['sshs_model_hash'][:12]}"
    checks["lora_changes_image"] = with_lora != at_zero
    checks["strength_0_is_base"] = at_zero == before
    checks["model_unchanged"] = before == after

    if args.stop_test:
        call(args.url, "/inplace-lora/v1/train", train_request(args.dataset, args.name + "_stop", 200))
        while call(args.url, "/inplace-lora/v1/status").get("step", 0) < 1:
            time.sleep(2)
        call(args.url, "/sdapi/v1/interrupt", {})
        stopped = wait(args.url, 600)
        kept = Path(stopped.get("lora_file") or "")
        report["stop"] = {k: stopped.get(k) for k in ("status", "step", "lora_file", "messages")}
        checks["stop_keeps_last_step"] = stopped.get("status") == "stopped" and kept.is_file() \
            and f"-step{stopped['step']:08d}" in kept.stem
        checks["stopped_lora_has_card"] = bool(stopped.get("card_preview")) and Path(stopped["card_preview"]).is_file()
        checks["stop_says_how_to_resume"] = '"resume": true' in ((stopped.get("messages") or [""])[-1])
        checks["model_unchanged_after_stop"] = txt2img(args.url, prompt)[0] == before
        target = stopped["step"] + 2
        call(args.url, "/inplace-lora/v1/train", train_request(args.dataset, args.name + "_stop", target, resume=True))
        resumed = wait(args.url, args.timeout)
        report["resume"] = {k: resumed.get(k) for k in ("status", "step", "lora_file", "error", "messages")}
        checks["resume_finishes_the_run"] = resumed.get("status") == "done" and resumed.get("step") == target \
            and any("resumed from" in m and f"at step {stopped['step']}" in m for m in resumed.get("messages", []))
        checks["model_unchanged_after_resume"] = txt2img(args.url, prompt)[0] == before
    report["ok"] = all(checks.values())
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
