"""fp8_compute against the default bf16 step: loss curves and the trained LoRA's effect.

Run through `python -m bench.equivalence [sd15|sdxl] [batch] [steps] fp8c [out=DIR]`; bench/equivalence.py
says what is compared and the bounds. The noise floor is a second bf16 run (the plain step without
the CUDA graph), whose only differences to the reference are the kernels' summation order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import ALPHA, RANK

EFFECT_MIN_COSINE = 0.95
EFFECT_MAX_REL = 0.35


def lora_deltas(model, name: str, files: list[dict]) -> tuple[list, object]:
    """For each LoRA (kohya tensors): the UNet output with it at strength 1 minus the output without,
    on one seeded batch of 2 (t = 300, 700), bf16 forward as the host samples."""
    import torch

    from engine.config import TrainConfig
    from engine.lora.targets import build_network

    from .workload import random_cond, random_latents

    dev = model.device
    context, pooled = random_cond(name, 2)
    cond = {"context": context.to(dev)} if pooled is None else {"context": context.to(dev), "pooled": pooled.to(dev)}
    x = random_latents(name, 2).to(dev)
    t = torch.tensor([300, 700], device=dev)
    deltas = []
    with torch.no_grad():
        base = model.predict(x, t, cond).float()
        for tensors in files:
            net = build_network(model, TrainConfig(train_data_dir=".", output_dir=".", lora_rank=RANK,
                                                   lora_alpha=ALPHA)).to(dev, torch.float32)
            net.load_kohya_state_dict(tensors)
            with net.applied(1.0):
                deltas.append(model.predict(x, t, cond).float() - base)
    return deltas, base


def effect(delta, ref_delta, base) -> dict:
    import torch.nn.functional as F

    mse = float((delta - ref_delta).pow(2).mean())
    peak = float((base + ref_delta).abs().max())
    return dict(cosine=float(F.cosine_similarity(delta.flatten(), ref_delta.flatten(), dim=0)),
                rel=float((delta - ref_delta).norm() / ref_delta.norm().clamp_min(1e-30)),
                psnr_db=10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf"))


def fp8c_main(model, name: str, root: Path, batch: int, steps: int, out_dir: str | None) -> int:
    import torch

    from .equivalence import BOUNDS, VARIANTS, _compare, run

    out, rows, ok = {}, [], True
    for gc in (False, True):
        key = f"{name} b{batch} gc={gc}"
        ref = run(model, root, batch, steps, gc, **VARIANTS["graph native"])
        floor = run(model, root, batch, steps, gc, **VARIANTS["plain native"])
        got = run(model, root, batch, steps, gc, fp8_compute=True, **VARIANTS["graph native"])
        out[key] = {"reference (bf16, graph)": ref.losses}
        _compare(out, key, "floor (bf16, plain)", ref.losses, floor.losses, BOUNDS["fp8"])
        curve_ok = _compare(out, key, "fp8_compute", ref.losses, got.losses, BOUNDS["fp8"])
        (d_ref, d_floor, d_got), base = lora_deltas(model, name, [ref.tensors, floor.tensors, got.tensors])
        e_got, e_floor = effect(d_got, d_ref, base), effect(d_floor, d_ref, base)
        effect_ok = e_got["cosine"] >= EFFECT_MIN_COSINE and e_got["rel"] <= EFFECT_MAX_REL
        out[key]["lora effect"] = {"fp8_compute": e_got, "floor (bf16, plain)": e_floor, "within": effect_ok}
        print(f"{key} LoRA effect: fp8_compute cosine {e_got['cosine']:.4f}, rel {e_got['rel']:.3f}, "
              f"PSNR {e_got['psnr_db']:.1f} dB (floor: {e_floor['cosine']:.4f}, {e_floor['rel']:.3f}, "
              f"{e_floor['psnr_db']:.1f} dB) -> {'OK' if effect_ok else 'DIFFERENT'}", flush=True)
        ok &= curve_ok and effect_ok
        c, f = out[key]["fp8_compute"], out[key]["floor (bf16, plain)"]
        rows.append(f"| {name} | {batch} | {'on' if gc else 'off'} | {len(got.losses)} | "
                    f"{100 * c['max_rel']:.2f}% / {100 * c['mean_rel']:.2f}% | {100 * f['max_rel']:.2f}% / "
                    f"{100 * f['mean_rel']:.2f}% | "
                    f"{e_got['cosine']:.4f} / {e_got['rel']:.3f} / {e_got['psnr_db']:.1f} dB | "
                    f"{e_floor['cosine']:.4f} / {e_floor['rel']:.3f} / {e_floor['psnr_db']:.1f} dB | "
                    f"{'✅' if curve_ok and effect_ok else '❌'} |")
    print("EQUIVALENCE " + json.dumps(out), flush=True)
    if out_dir:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"equivalence_{name}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        head = [f"fp8_compute vs the default bf16 step (CUDA graph), {torch.cuda.get_device_name()}, torch "
                f"{torch.__version__}, LoRA rank {RANK}, lr 1e-3, same seed. Loss: largest per-step / mean "
                f"relative difference (bound {100 * BOUNDS['fp8'][0]:g}% / {100 * BOUNDS['fp8'][1]:g}%). LoRA "
                f"effect: the UNet output change at strength 1 against the bf16-trained LoRA's: cosine / relative "
                f"difference / PSNR (bound cosine >= {EFFECT_MIN_COSINE}, rel <= {EFFECT_MAX_REL}). Floor: a second "
                f"bf16 run (plain step, no graph).", "",
                "| model | batch | ckpt | steps | loss fp8_compute | loss floor | LoRA effect fp8_compute | "
                "LoRA effect floor | pass |", "|---|---|---|---|---|---|---|---|---|"]
        (folder / f"equivalence_{name}.md").write_text("\n".join(head + rows) + "\n", encoding="utf-8")
    return 0 if ok else 1
