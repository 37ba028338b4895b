"""Our engine, as a user runs it: `engine.train.train()` on an image folder, with the engine's own
data pipeline (bucketing, in-memory latent and text caches), loop, hooks and optimizer.

    python -m bench.ours --configs '[{"tool": "ours", "model": "sd15", "batch": 1, ...}]'

Tool "ours-eager" is the same with `cuda_graph: false` (the plain step), to show what the graph buys;
"ours-attn" puts LoRA on the attention projections only (`target_modules: attention`, the layers
diffusers-peft adapts), for a like-for-like comparison with that peer; "ours-autocast" runs every
forward under autocast (`autocast: always`), as the engine did before bf16 weights ran natively;
"ours-fp8" keeps the UNet's Linear/Conv2d weights in fp8 (what `fp8_base: true` does); "ours-fp8c" runs
the transformer Linears on fp8 tensor cores (`fp8_compute: true`, engine/models/fp8_compute.py),
"ours-fp8c-fp8" does that on the fp8-stored weights of ours-fp8, "ours-fp8c-compile" with
`torch_compile: true` too; "ours-compile"
compiles the step with torch.compile (`torch_compile: true`; the compile runs in the warm-up steps;
Flux.1 compiles its blocks instead), "ours-fp8-compile" does that on ours-fp8's weights;
"ours-host-geglu" runs each GEGLU's own forward instead of the engine's lean one (engine/models/geglu.py),
"ours-cast-each" casts each LoRA weight on its own instead of all together (`cast_together` in
engine/lora/network.py), and "ours-copy-up" adds each Linear LoRA's up projection with the copying
addmm instead of in place (engine/lora/up_add.py), and "ours-flux-keep-all" lets Flux's blocks keep every
tensor for backward as autograd would (no recipes, engine/models/flux_lean.py), to measure what each of
those buys. Those four switch the optimisation off through `EngineOptions` (engine/options.py), passed to `train()`. "ours-loha",
"ours-lokr" and "ours-dora" train LyCORIS' LoHa, LoKr (factor -1) and DoRA (`network_type`) instead of LoRA.

Steps are timed from the loop's `step` events (each followed by a device sync); the peak memory is
reset when the loop starts, after caching, so it covers the training steps.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED, StepClock, device, emit, error_row, finish_row, log, parse_configs, reset_memory
from .workload import engine_model, image_folder


VARIANTS = {"ours-eager": {"cuda_graph": False}, "ours-attn": {"target_modules": "attention"},
            "ours-autocast": {"autocast": "always"}, "ours-fp8": {},
            "ours-compile": {"torch_compile": True}, "ours-fp8-compile": {"torch_compile": True},
            "ours-fp8c": {"fp8_compute": True},
            "ours-fp8c-fp8": {"fp8_compute": True}, "ours-fp8c-compile": {"fp8_compute": True, "torch_compile": True},
            # the LyCORIS variants (engine/lora/variants/) on the same layers, rank and alpha
            "ours-loha": {"network_type": "loha"}, "ours-lokr": {"network_type": "lokr"},
            "ours-dora": {"network_type": "dora"},
            # kohya's cpu_offload_checkpointing (Flux.1; rows with checkpointing on)
            "ours-offload": {"cpu_offload_checkpointing": True}, "ours-fp8-offload": {"cpu_offload_checkpointing": True}}
FP8_STORED = ("ours-fp8", "ours-fp8c-fp8", "ours-fp8-offload", "ours-fp8-compile")  # tools whose model keeps its weights in fp8 (fp8_base)
# tools that turn one engine optimisation off (EngineOptions fields), to measure what it buys
SWITCHED_OFF = {"ours-host-geglu": {"lean_geglu": False}, "ours-copy-up": {"up_in_place": False},
                "ours-cast-each": {"cast_together": False}, "ours-flux-keep-all": {"lean_flux": False}}


def engine_options(tool: str):
    """The EngineOptions a tool runs with (the defaults for every tool but the switched-off ones)."""
    from engine.options import EngineOptions

    return EngineOptions(**SWITCHED_OFF.get(tool, {}))


def build_model(cfg):
    """The row's model; ours-fp8 (and ours-fp8c-fp8) store the UNet's Linear/Conv2d weights in fp8 as
    `fp8_base: true` does for a base_model the engine loads (the benchmark builds its model, so it
    converts it here)."""
    if cfg.model == "flux1":  # Flux.1-dev (workload_flux.py); ours-fp8 = fp8_base on its Linear weights
        from .workload_flux import engine_model as flux_model

        model = flux_model()
    else:
        model = engine_model(cfg.model)
    if cfg.tool in FP8_STORED:
        from engine.models.fp8 import store_in_fp8

        store_in_fp8(model.transformer if cfg.model == "flux1" else model.unet)
    return model


def run_config(model, cfg, root: Path, extra: dict | None = None, on_start=None, on_last_step=None, on_step=None,
               options=None):
    import torch

    from engine.config import TrainConfig
    from engine.events import FunctionCallback
    from engine.train import train

    clock = StepClock()
    infos: list[str] = []
    training_peak: list[int] = []

    def on_event(event):
        if event.kind == "start":
            reset_memory()
            if on_start is not None:
                on_start()
            clock.start()
        elif event.kind == "step":
            clock.tick()
            if on_step is not None:
                on_step(event.step)
            if event.step == event.total_steps and torch.cuda.is_available():
                training_peak.append(torch.cuda.max_memory_allocated())
                if on_last_step is not None:
                    on_last_step()
        elif event.kind == "info" and event.message:
            infos.append(event.message)

    tc = TrainConfig(train_data_dir=str(image_folder(root, cfg.model)), output_dir=str(root / "out"),
                     output_name=f"{cfg.model}_b{cfg.batch}", resolution="auto", batch_size=cfg.batch,
                     max_train_steps=cfg.warmup + cfg.steps, lora_rank=RANK, lora_alpha=ALPHA,
                     mixed_precision="bf16", gradient_checkpointing=cfg.gradient_checkpointing,
                     cache_latents="memory" if cfg.cached else "off", save_every_n_epochs=0, seed=SEED,
                     device=device(), **(extra or {}))
    try:
        train(tc, model, callbacks=[FunctionCallback(on_event)], options=options or engine_options(cfg.tool))
    except BaseException as exc:
        exc.bench_notes = recovery_notes(infos)  # run_rows puts them on the row that reports the error
        raise
    # what the row ran: the graph, and with torch_compile what was compiled or why not
    notes = [m for m in infos if "CUDA-graphed" in m or m.startswith("torch_compile")] + recovery_notes(infos)
    row = finish_row(cfg, clock.step_times(cfg.warmup), cfg.batch, notes=notes)
    if training_peak and row.peak_gib is not None:
        # the training peak (first step to last, as the peers are measured); the run's end, which puts
        # the parked VAE and text encoders back on the GPU after freeing the optimizer, is noted apart
        row.notes.append(f"whole run including the end (encoders back on the GPU): {row.peak_gib:.2f} GiB")
        row.peak_gib = training_peak[0] / 2**30
    return row


def recovery_notes(infos: list[str]) -> list[str]:
    """The engine's out-of-memory info events (engine/memory/recovery.py: checkpointing turned on, the
    micro-batch split, caching on the CPU; a preview skipped): a row that went through them did not train
    as configured, and its peak includes the attempt that ran out of memory."""
    return [m for m in infos if "out of memory" in m or "out-of-memory" in m]


def run_rows(configs, build_model, run_row, prefix: str) -> None:
    """One model for all rows (built from the first row's config), each row emitted as it finishes; a failed row is
    a result too (an OOM is reported as such even when the engine wrapped it in its own error)."""
    import torch

    root = Path(tempfile.mkdtemp(prefix=prefix))
    model = None
    for cfg in configs:
        reset_memory()
        try:
            if model is None:
                model = build_model(cfg)
            row = run_row(model, cfg, root)
        except Exception as exc:  # noqa: BLE001 - a failed row is a result too
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc.__cause__ if isinstance(exc.__cause__, torch.OutOfMemoryError) else exc)
            row.notes += getattr(exc, "bench_notes", [])
        emit(row)


def main(argv=None):
    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    run_rows(configs, build_model, lambda model, cfg, root: run_config(model, cfg, root, VARIANTS.get(cfg.tool)),
             prefix="bench_ours_")


if __name__ == "__main__":
    main()
