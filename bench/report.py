"""bench/RESULTS.md and bench/results.png from bench/results.json: the table, the ratios, the targets."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

PEERS = ("comfyui-native", "diffusers-peft", "diffusers-peft-bf16", "diffusers-peft-attn", "kohya", "kohya-fp8")
# peers that train at least the workload's layers (kohya's defaults): the memory target compares with these;
# diffusers-peft-attn trains fewer (attention only) and is compared with ours-attn instead
SAME_LAYER_PEERS = ("comfyui-native", "diffusers-peft", "diffusers-peft-bf16", "kohya")
FP8_COMPUTE_TOOLS = ("ours-fp8c", "ours-fp8c-fp8", "ours-fp8c-compile")  # issue 23's rows
TOOL_NOTES = {  # our variant tools, in the table's column order, and what each one is
    "ours-eager": "- ours-eager is our engine with `cuda_graph: false` (the plain step): the difference to ours "
                  "is what replaying the step as one CUDA graph buys.",
    "ours-autocast": "- ours-autocast is our engine with `autocast: always` (every forward under autocast, as "
                     "diffusers' and kohya's scripts run): the difference to ours is what computing the bf16 "
                     "model natively buys.",
    "ours-attn": "- ours-attn is our engine with LoRA on the attention projections only (the layers "
                 "diffusers' scripts and SimpleTuner adapt): the like-for-like comparison with "
                 "diffusers-peft-attn.",
    "ours-fp8": "- ours-fp8 is our engine with the UNet's Linear/Conv2d weights stored in fp8 (`fp8_base: true`; "
                "each layer computes in bf16 under autocast): the optional low-memory mode.",
    "ours-fp8c": "- ours-fp8c is our engine with `fp8_compute: true`: the transformer blocks' Linear layers multiply "
                 "on fp8 tensor cores (forward and input gradient, row-wise e4m3 scales; an fp8 copy of their bf16 "
                 "weights is held for the run), LoRA, convolutions and attention in bf16.",
    "ours-fp8c-fp8": "- ours-fp8c-fp8 is ours-fp8c on the fp8-stored weights of ours-fp8 (`fp8_base: true` too): "
                     "no fp8 copy, half the weight memory.",
    "ours-fp8c-compile": "- ours-fp8c-compile is ours-fp8c with `torch_compile: true` (inductor fuses the fp8 "
                         "quantisation into the ops before it).",
    "ours-compile": "- ours-compile is our engine with `torch_compile: true` (the step compiled by inductor, "
                    "inside the CUDA graph; Flux.1: its double and single blocks, each kind once; compiling "
                    "happens in the warm-up steps, which are not timed).",
    "ours-fp8-compile": "- ours-fp8-compile is ours-fp8 with `torch_compile: true` (the fp8 weight casts "
                        "compiled with the rest).",
    "ours-host-geglu": "- ours-host-geglu is our engine with each GEGLU running the model's own forward instead of "
                       "the lean one (engine/models/geglu.py): the difference to ours is what holding only the "
                       "projection buys.",
    "ours-flux-keep-all": "- ours-flux-keep-all is our engine with Flux's blocks keeping every tensor for backward "
                          "instead of recipes of the cheap ones (engine/models/flux_lean.py): the difference to ours "
                          "is the memory the recipes save and the time their recomputation costs.",
    "ours-cast-each": "- ours-cast-each is our engine casting each LoRA weight to bf16 on its own (two kernels per "
                      "weight a step) instead of all together: the difference to ours is what `cast_together` buys.",
    "ours-copy-up": "- ours-copy-up is our engine adding each Linear LoRA's up projection onto the base output with "
                    "the copying addmm instead of in place: the difference to ours is what engine/lora/up_add.py "
                    "buys.",
    "ours-comfyui": "- ours-comfyui is our engine through the ComfyUI adapter (ComfyUI's ModelPatcher, CLIP and "
                    "VAE, as the LoRA Trainer node runs it). ComfyUI keeps CLIP and the VAE on the GPU while "
                    "training (its model management loads all three), hence the higher peak. Its rows record the "
                    "ours row timed in the same run (`paired_ours`); the ComfyUI-path lines under Targets compare "
                    "with that, while the table's ratio column compares with the ours column, which may come "
                    "from another run (each row's notes say which).",
    "ours-comfyui-compile": "- ours-comfyui-compile is ours-comfyui with `torch_compile: true` (Dynamo traces "
                            "ComfyUI's own UNet); the ComfyUI-path lines under Targets compare it with ours-compile.",
}
PEER_NOTES = {
    "diffusers-peft-bf16": "- diffusers-peft-bf16 is diffusers' loop as its scripts run under `--mixed_precision "
                           "bf16`: the LoRA weights stay bf16 (the scripts upcast them to float32 only for fp16), "
                           "so AdamW updates bf16 weights; diffusers-peft upcasts them, as our engine keeps float32 "
                           "masters. The speed targets take the fastest of all peers.",
}
# SimpleTuner H100, bf16, cached, batch 1, checkpointing: (GiB, what it trained)
PUBLISHED_GIB = {"sd15": (1.98, "LoRA r16 on to_q/k/v/out.0 with adamw_bf16, which keeps LoRA weights and optimizer states in bf16"),
                 "sdxl": (6.53, "LyCORIS LoKr")}


def _rows(data):
    return [r for r in data["rows"]]


def _get(rows, tool, model, batch, gc, cached):
    for r in rows:
        if (r["tool"], r["model"], r["batch"], r["gradient_checkpointing"], r["cached"]) == (tool, model, batch, gc, cached):
            return r
    return None


def _cell(r) -> str:
    if r is None:
        return "not run"
    if r.get("error"):
        e = r["error"]
        if e == "OOM" or e.startswith("n/a") or e.startswith("not run"):
            return e.split(":")[0]
        return "failed"
    mfu = f", {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mfu += f" / {100 * r['mfu_fp8']:.1f}%" if r.get("mfu_fp8") is not None else ""
    return f"{r['images_per_s']:.2f} img/s, {r['peak_gib']:.2f} GiB{mfu}"


def _ok(r) -> bool:
    return r is not None and not r.get("error") and r.get("images_per_s")


def workload_sort(r) -> tuple:
    return (r["model"], not r["cached"], r["gradient_checkpointing"], r["batch"])


def workload_keys(rows):
    keys = sorted({(r["model"], r["batch"], r["gradient_checkpointing"], r["cached"]) for r in rows},
                  key=lambda k: (k[0], not k[3], k[2], k[1]))
    return keys


def targets(rows) -> list[str]:
    lines = []
    for model, batch, gc, cached in workload_keys(rows):
        ours = _get(rows, "ours", model, batch, gc, cached)
        if not _ok(ours):
            continue
        peers = [p for p in (_get(rows, t, model, batch, gc, cached) for t in PEERS) if _ok(p)]
        if not peers:
            continue
        best = max(peers, key=lambda p: p["images_per_s"])  # any peer, attention-only included
        ratio = ours["images_per_s"] / best["images_per_s"]
        need = 3.0 if batch == 1 else 1.5
        hit = ratio >= need
        same = [p for p in peers if p["tool"] in SAME_LAYER_PEERS]
        mem = speed_same = "–"
        if same:
            fast = max(same, key=lambda p: p["images_per_s"])
            r_same = ours["images_per_s"] / fast["images_per_s"]
            speed_same = f"{r_same:.2f}x vs {fast['tool']} {'✅' if r_same >= need else '❌'}"
            low = min(same, key=lambda p: p["peak_gib"])
            mem = (f"{ours['peak_gib']:.2f} vs {low['peak_gib']:.2f} GiB ({low['tool']}) "
                   f"{'✅' if ours['peak_gib'] <= low['peak_gib'] + 1e-9 else '❌'}")
        attn, peft = (_get(rows, t, model, batch, gc, cached) for t in ("ours-attn", "diffusers-peft-attn"))
        like = "–"
        if _ok(attn) and _ok(peft):
            r_attn = attn["images_per_s"] / peft["images_per_s"]
            like = (f"{r_attn:.2f}x {'✅' if r_attn >= need else '❌'}; {attn['peak_gib']:.2f} vs "
                    f"{peft['peak_gib']:.2f} GiB {'✅' if attn['peak_gib'] <= peft['peak_gib'] + 1e-9 else '❌'}")
        lines.append(f"| {model} b{batch} gc={'on' if gc else 'off'}{'' if cached else ' uncached'} | "
                     f"{ratio:.2f}x vs {best['tool']} (need {need:g}x) {'✅' if hit else '❌'} | {speed_same} | "
                     f"{mem} | {like} |")
    head = ["| row | speed: ours / fastest peer (any layers) | speed: ours / fastest peer on the same layers | "
            "memory: ours vs lowest peer on the same layers | attention only: ours-attn vs diffusers-peft-attn "
            "(speed; memory) |", "|---|---|---|---|---|"]
    extra = []
    for model, (pub, what) in PUBLISHED_GIB.items():
        for tool in ("ours", "ours-attn"):
            r = _get(rows, tool, model, 1, True, True)
            if _ok(r):
                extra.append(f"- {model} batch 1, checkpointing, cached, {tool}: {r['peak_gib']:.2f} GiB against "
                             f"SimpleTuner's published {pub} GiB ({what}) {'✅' if r['peak_gib'] < pub else '❌'}")
    for tool, how in (("ours", "default step"), ("ours-compile", "`torch_compile: true`")):
        r = _get(rows, tool, "sd15", 8, False, True)
        if _ok(r) and r.get("mfu") is not None:
            extra.append(f"- SD1.5 batch 8, no checkpointing, {tool} ({how}): MFU {100 * r['mfu']:.1f}% "
                         f"(target 35%) {'✅' if r['mfu'] >= 0.35 else '❌'}")
    for alone, comfy in (("ours", "ours-comfyui"), ("ours-compile", "ours-comfyui-compile")):
        for model, gc, b in itertools.product(("sd15", "sdxl"), (False, True), (1, 4, 8)):
            a, c = _get(rows, alone, model, b, gc, True), _get(rows, comfy, model, b, gc, True)
            if _ok(c) and c.get("paired_ours"):  # ours timed in the same run as this row: compare with that
                a, same_run = c["paired_ours"], " (both in one run)"
            else:
                same_run = ""
            if _ok(a) and _ok(c):
                extra.append(f"- ComfyUI path vs standalone{' (compiled)' if alone != 'ours' else ''}, "
                             f"{model} b{b}{' checkpointing' if gc else ''}{same_run}: "
                             f"{c['images_per_s'] / a['images_per_s']:.2f}x "
                             f"(target >= 0.90) {'✅' if c['images_per_s'] >= 0.9 * a['images_per_s'] else '❌'}; "
                             f"peak {c['peak_gib']:.2f} vs {a['peak_gib']:.2f} GiB")
    return head + lines + [""] + extra


def fp8_targets(rows) -> list[str]:
    """Issue 23: the best fp8_compute variant against the fastest peer (either diffusers variant included)
    in every row where both ran, and its memory against every peer's."""
    lines = []
    for model, batch, gc, cached in workload_keys(rows):
        ours = [r for r in (_get(rows, t, model, batch, gc, cached) for t in FP8_COMPUTE_TOOLS) if _ok(r)]
        peers = [p for p in (_get(rows, t, model, batch, gc, cached) for t in PEERS) if _ok(p)]
        if not ours or not peers:
            continue
        best, fast = max(ours, key=lambda r: r["images_per_s"]), max(peers, key=lambda p: p["images_per_s"])
        low = min(peers, key=lambda p: p["peak_gib"])
        ratio = best["images_per_s"] / fast["images_per_s"]
        lines.append(f"| {model} b{batch} gc={'on' if gc else 'off'}{'' if cached else ' uncached'} | {best['tool']} | "
                     f"{ratio:.2f}x vs {fast['tool']} (need 1.5x) {'✅' if ratio >= 1.5 else '❌'} | "
                     f"{best['peak_gib']:.2f} vs {low['peak_gib']:.2f} GiB ({low['tool']}) "
                     f"{'✅' if best['peak_gib'] <= low['peak_gib'] + 1e-9 else '❌'} | "
                     f"{_pct(best.get('mfu'))} / {_pct(best.get('mfu_fp8'))} |")
    if not lines:
        return []
    return ["", "## Targets (issue 23: fp8_compute)", "",
            "| row | fastest fp8_compute tool | speed vs the fastest peer | memory vs the lowest peer | "
            "MFU bf16 / fp8 peak |", "|---|---|---|---|---|"] + lines


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "–"


def _fill_fp8_mfu(rows, gpu: dict) -> None:
    """MFU against the fp8 peak for rows measured before it was recorded (results.json of older runs)."""
    from .run import DENSE_FP8_TFLOPS, peak_for

    peak = gpu.get("dense_fp8_tflops") or peak_for(gpu.get("name") or "", DENSE_FP8_TFLOPS)
    for r in rows:
        if r.get("tflops") and r.get("mfu_fp8") is None and peak:
            r["mfu_fp8"] = r["tflops"] / peak


def write_report(data: dict, folder: Path) -> None:
    rows = _rows(data)
    tools = ["ours"] + [t for t in (*TOOL_NOTES, *PEERS) if any(r["tool"] == t for r in rows)]
    gpu = data.get("gpu", {})
    _fill_fp8_mfu(rows, gpu)
    out = ["# Benchmark results", "",
           f"GPU: {gpu.get('name')} (dense bf16 peak {gpu.get('dense_bf16_tflops')} TFLOP/s, dense fp8 peak "
           f"{gpu.get('dense_fp8_tflops')} TFLOP/s, driver {gpu.get('driver')}, CUDA {gpu.get('cuda')}). "
           f"Date: {data.get('date')}.",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items() if v), "",
           "Each cell: images/s (median of the timed steps, each step synchronised; with `--repeat` the "
           "median of the repetitions, listed in the row's notes), peak "
           "`torch.cuda.max_memory_allocated` during training, MFU (model FLOPs from "
           "`torch.utils.flop_counter`, no recompute, over the dense bf16 peak / over the dense fp8 peak). "
           "Full-size UNets with random weights, LoRA rank 16, bf16, cached latents and text unless marked "
           "uncached. How each tool is run: bench/README.md.", ""]
    out.append("| model | batch | ckpt | cached | " + " | ".join(tools) + " | " +
               " | ".join(f"ours / {t}" for t in tools[1:]) + " |")
    out.append("|" + "---|" * (4 + 2 * len(tools) - 1))
    for model, batch, gc, cached in workload_keys(rows):
        cells = [_get(rows, t, model, batch, gc, cached) for t in tools]
        ratios = []
        for c in cells[1:]:
            if _ok(c) and c.get("paired_ours"):  # ours timed in the same run as this row
                ratios.append(f"{c['paired_ours']['images_per_s'] / c['images_per_s']:.2f}x*")
            else:
                ratios.append(f"{cells[0]['images_per_s'] / c['images_per_s']:.2f}x" if _ok(cells[0]) and _ok(c) else "–")
        out.append(f"| {model} | {batch} | {'on' if gc else 'off'} | {'yes' if cached else 'no'} | "
                   + " | ".join(_cell(c) for c in cells) + " | " + " | ".join(ratios) + " |")
    out += ["", "## Reading the numbers", "",
            "- Layers: the workload puts LoRA on kohya's default targets (every Linear/1x1 conv in the "
            "transformer blocks: 192 modules in SD1.5, 722 in SDXL); ours, kohya and diffusers-peft train "
            "those. diffusers-peft-attn is the same loop on the attention projections only, as diffusers' "
            "scripts (and SimpleTuner) default to (128 / 560 modules: less work, fewer saved activations and "
            "a smaller optimizer); it is compared with ours-attn, which trains the same. ComfyUI's node "
            "trains every Linear/Conv2d plus bias and norm diffs. The speed target takes the fastest peer on "
            "any layers; the memory target the lowest peer on the same layers or more.",
            "- ComfyUI's node runs the UNet on B*B samples at batch B (see its notes); images/s counts the B "
            "images a step trains on.",
        ] + [{**TOOL_NOTES, **PEER_NOTES}[t] for t in tools if t in TOOL_NOTES or t in PEER_NOTES] + [
            "- Peak memory includes the resident bf16 UNet (SD1.5 1.60 GiB, SDXL 4.78 GiB). Ours parks the "
            "VAE and text encoders in CPU memory while it trains from caches; peers that keep them on the "
            "GPU would show them in their peak, those fed cached tensors here (diffusers-peft, comfyui-native) "
            "never load them.",
            "- Peak memory is over the training steps, first to last, for every tool. Ours also notes the "
            "whole run: at its end it frees the optimizer and graphs, then puts the parked encoders back on "
            "the GPU (to leave a host's model as it was), so the end stays below what the loaded model used "
            "before training; each ours row's notes give that figure.",
            "- A ratio marked * compares with the ours row timed in the same run as that tool's row (its "
            "notes say which run); unmarked ratios compare with the ours column.",
            "", "## Targets (issue 5)", ""] + targets(rows) + fp8_targets(rows)
    errors = [r for r in rows if r.get("error")]
    if errors:
        out += ["", "## Rows without a number", ""]
        out += [f"- {r['tool']} {r['model']} b{r['batch']} ckpt={'on' if r['gradient_checkpointing'] else 'off'} "
                f"cached={r['cached']}: {r['error']}" for r in errors]
    noted = [r for r in sorted(rows, key=lambda r: (r["tool"], *workload_sort(r))) if r.get("notes")]
    if noted:
        out += ["", "## Notes from the runs", ""] + [
            f"- {r['tool']} {r['model']} b{r['batch']} ckpt={'on' if r['gradient_checkpointing'] else 'off'}"
            f"{'' if r['cached'] else ' uncached'}: " + "; ".join(r["notes"]) for r in noted]
    if _plot(rows, tools, folder / "results.png"):
        out += ["", "![images/s per row](results.png)"]
    (folder / "RESULTS.md").write_text("\n".join(out) + "\n", encoding="utf-8")


def _plot(rows, tools, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path.exists()
    keys = workload_keys(rows)
    if not keys:
        return False
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(keys) * 0.9), 8))
    width = 0.8 / len(tools)
    colours = plt.get_cmap("tab20").colors  # more tools than the default cycle's ten colours
    for ax, metric, label in ((axes[0], "images_per_s", "images/s (log)"), (axes[1], "peak_gib", "peak GiB")):
        for i, tool in enumerate(tools):
            vals = []
            for k in keys:
                r = _get(rows, tool, *k)
                vals.append(r[metric] if _ok(r) else 0)
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=tool,
                   color=colours[i % len(colours)])
        ax.set_ylabel(label)
        if metric == "images_per_s":
            ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{m}\nb{b} {'gc' if gc else ''}{'' if c else ' nc'}" for m, b, gc, c in keys], fontsize=7)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the bars fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    p = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json"
    write_report(json.loads(p.read_text()), p.parent)
