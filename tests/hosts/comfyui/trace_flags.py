"""Which flags of the host model a graph changes, and which code changes them (not collected by pytest).

Runs on one ComfyUI server (this folder's server.py; COMFYUI_ROOT picks the ComfyUI), each graph
between two detailed fingerprints (probe_nodes/, `detail`), and prints every per-tensor and per-module
difference with the call sites probe_nodes/flag_trace.py recorded meanwhile:

0. encode: CLIPTextEncode alone (ComfyUI's text encoding, nothing else);
1. trainer: the style example's trainer with the text encoder, its end preview and Save LoRA, and no
   ComfyUI LoRA sampling (no Preview LoRA Strengths), on the checkpoint;
2. control: ComfyUI alone, LoraLoader + KSampler with that LoRA on a fresh copy of the checkpoint;
3. style: the whole style example (trainer + Preview LoRA Strengths) on the first checkpoint again.

    COMFYUI_ROOT=/path/ComfyUI python tests/hosts/comfyui/trace_flags.py /path/venv/bin/python [out.json [step,step]]
"""
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import conftest  # noqa: E402  (the checkpoint's cached name)
from host_diff import changes as diff, summary  # noqa: E402
from comfy_workflows import STYLE, cpu_sized, fingerprint_graph, load_api, make_images, one, txt2img, ui_text  # noqa: E402


def census(fp):
    """How many tensors of each part have which flags: {part: {"p rg=True inf=True float16 cpu": n}}."""
    out = {}
    for part in ("unet", "clip", "vae"):
        c = out.setdefault(part, {})
        for t in fp["table"][part]["tensors"].values():
            k = f"{t['kind']} rg={t['requires_grad']} inf={t['inference']} {t['dtype']} {t['device']} {t['class']}"
            c[k] = c.get(k, 0) + 1
    return out


def main(python, out_path=None, only=()):
    sys.modules.setdefault("comfyui_host_server", conftest._load_server_module())
    server_mod = sys.modules["comfyui_host_server"]
    cache = os.environ.get("COMFYUI_TEST_CACHE") or os.path.expanduser("~/.cache/inplace-lora-trainer")
    ckpt_src = os.path.join(cache, conftest.CHECKPOINT_NAME)
    base = tempfile.mkdtemp(prefix="trace-flags-")
    server_mod.make_base_dir(base)
    os.symlink(conftest.PROBE_PACK, os.path.join(base, "custom_nodes", "inplace_lora_test_probe"))
    os.environ["INPLACE_LORA_TRACE_FLAGS"] = "1"
    server = server_mod.ComfyServer(python, base).start()
    report = {"root": server.root, "steps": {}}
    try:
        def run(graph):
            entry = server.wait(server.post_prompt(graph), timeout=1800)
            assert entry["status"]["status_str"] == "success", json.dumps(server.status_events(entry))[:3000]
            return entry

        def fp(ckpt):
            """The detailed fingerprint and the flag changes logged since the last one; one prompt that
            holds the loader, so ComfyUI's cache keeps the loaded model (a prompt without it drops it,
            and the next fingerprint would see a fresh load)."""
            g = fingerprint_graph(ckpt)
            g["201"]["inputs"]["detail"] = True
            g["300"] = {"class_type": "InplaceLoRATest_FlagTrace", "inputs": {"after": ["201", 0]}}
            entry = run(g)
            return json.loads(ui_text(entry, "201")), json.loads(ui_text(entry, "300"))

        def step(name, ckpt, graph):
            if only and name not in only:
                return []
            before, _ = fp(ckpt)
            t0 = time.monotonic()
            run(graph)
            seconds = time.monotonic() - t0
            after, calls = fp(ckpt)  # its unload_all_models unpatches: those calls are the graph's too
            changes = diff(before, after)
            report["steps"][name] = {"seconds": round(seconds, 1), "changes": summary(changes), "calls": calls,
                                     "n_changes": len(changes), "before": census(before), "after": census(after)}
            print(f"== {name} ({seconds:.0f} s): {len(changes)} changes", flush=True)
            print(json.dumps(report["steps"][name], indent=1), flush=True)
            return changes

        ckpt = server.link_checkpoint(ckpt_src)
        control_ckpt = server.link_checkpoint(ckpt_src, "sd15_control_copy.safetensors")
        make_images(server.path("input", "style_ds"))
        style = cpu_sized(load_api(STYLE), ckpt, "style_ds", name="trace_style", train_text_encoder=True)
        style[one(style, "InplaceLoRA_SaveLoRA")]["inputs"]["name"] = "tests/trace_style"
        encode = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                  "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "stripes", "clip": ["1", 1]}},
                  "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
                  "4": {"class_type": "InplaceLoRATest_HostFingerprint",
                        "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "after": ["3", 0]}}}
        step("encode", ckpt, encode)
        trainer_only = {k: v for k, v in style.items() if v["class_type"] != "InplaceLoRA_PreviewStrengths"
                        and v["class_type"] != "SaveImage"}
        step("trainer", ckpt, trainer_only)
        control = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": control_ckpt}},
                   "2": {"class_type": "LoraLoader", "inputs": {
                       "model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0, "strength_clip": 1.0,
                       "lora_name": "tests/trace_style.safetensors"}}}
        control.update(txt2img(control_ckpt, "control", model=["2", 0], clip=["2", 1], loader="1", seed=9))
        step("control", control_ckpt, control)
        style[one(style, "InplaceLoRA_SaveLoRA")]["inputs"].update(name="tests/trace_style_2")
        preview = one(style, "InplaceLoRA_PreviewStrengths")
        style[preview]["inputs"].update(prompt="stripes", negative="", strengths="0, 1", seed=5)
        step("style", ckpt, style)
    finally:
        server.stop()
        report["log_tail"] = server.log_text()[-3000:]
        if out_path:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, sys.argv[3].split(",") if len(sys.argv) > 3 else ())
