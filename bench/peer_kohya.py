"""kohya sd-scripts `train_network.py` / `sdxl_train_network.py`, run in-process with its own arguments.

kohya loads a model from a file or a diffusers folder, so the benchmark's random components (the same
seeded UNet every tool trains) are saved once as a diffusers pipeline folder; its tokenizers come from
`--tokenizer_cache_dir` (kohya would otherwise fetch them from the hub). The data is the benchmark's
image folder as a kohya `10_subject` subset (repeats keep epochs long). Arguments follow kohya's
documented LoRA recipe: `--network_module networks.lora --network_dim 16 --network_alpha 8
--mixed_precision bf16 --sdpa --network_train_unet_only --optimizer_type AdamW`, `--cache_latents`
for cached rows (SDXL also `--cache_text_encoder_outputs`; SD1.x has no such option and runs the text
encoder every step), `--gradient_checkpointing` as the row asks, no data-loader workers for cached rows.
Steps are timed at each `accelerator.backward` call (kohya reads `loss.item()` every step anyway).

    KOHYA_DIR=/path/to/sd-scripts python -m bench.peer_kohya --configs '[...]'
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED, SMOKE_RES, StepClock, WORKLOADS, emit, error_row, finish_row, log, parse_configs, reset_memory
from .workload import build_text_encoders, build_unet, build_vae, image_folder

TOKENIZER_IDS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")


def kohya_dir() -> Path:
    d = os.environ.get("KOHYA_DIR")
    if not d or not (Path(d) / "train_network.py").exists():
        sys.exit("set KOHYA_DIR to a kohya-ss/sd-scripts checkout (with train_network.py)")
    return Path(d)


def pipeline_folder(root: Path, model: str) -> Path:
    """The benchmark's random components as a diffusers folder kohya can load, plus tokenizer caches."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from engine.models.clip_tokenizer import clip_tokenizer

    folder = root / f"pipe_{model}"
    if (folder / "model_index.json").exists():
        return folder
    unet, vae, tes = build_unet(model), build_vae(model), build_text_encoders(model)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False)
    tok = clip_tokenizer()
    if WORKLOADS[model]["family"] == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=sched, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=tes[0], tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    del pipe, unet, vae, tes
    torch.cuda.empty_cache()
    for tid in TOKENIZER_IDS:
        tok.save_pretrained(str(root / "tokenizers" / tid.replace("/", "_")))
    return folder


def kohya_args(cfg, root: Path, pipe: Path, data: Path) -> list[str]:
    w = WORKLOADS[cfg.model]
    args = ["--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(data),
            "--output_dir", str(root / "out"), "--output_name", "bench", "--resolution", str(SMOKE_RES or w["resolution"]),
            "--train_batch_size", str(cfg.batch), "--max_train_steps", str(cfg.warmup + cfg.steps + 1),
            "--network_module", "networks.lora", "--network_dim", str(RANK), "--network_alpha", str(ALPHA),
            "--mixed_precision", "bf16", "--save_precision", "bf16", "--sdpa", "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--seed", str(SEED),
            "--tokenizer_cache_dir", str(root / "tokenizers"), "--caption_extension", ".txt",
            "--save_every_n_epochs", "100000"]
    if cfg.cached:
        args += ["--cache_latents", "--max_data_loader_n_workers", "0"]
        if w["family"] == "sdxl":
            args += ["--cache_text_encoder_outputs"]
    else:
        args += ["--max_data_loader_n_workers", "2", "--persistent_data_loader_workers"]
    if cfg.gradient_checkpointing:
        args += ["--gradient_checkpointing"]
    return args


def run_config(cfg, root: Path, pipe: Path, data: Path):
    sdxl = WORKLOADS[cfg.model]["family"] == "sdxl"
    if sdxl:
        import sdxl_train_network as script

        trainer = script.SdxlNetworkTrainer
    else:
        import train_network as script

        trainer = script.NetworkTrainer
    clock = train_timed(script, trainer, kohya_args(cfg, root, pipe, data))
    notes = [] if sdxl or not cfg.cached else ["SD1.x: kohya has no text-encoder output cache; CLIP runs every step"]
    return finish_row(cfg, clock.step_times(cfg.warmup), cfg.batch, notes=notes)


def train_timed(script, trainer, argv: list[str]) -> StepClock:
    """One kohya training run with kohya's own arguments, timed at each `accelerator.backward` (kohya
    reads `loss.item()` every step anyway). `script` is the imported `*_train_network` module,
    `trainer` its trainer class."""
    import accelerate

    from accelerate.state import AcceleratorState
    from library import strategy_base, train_util

    # kohya keeps its strategies and accelerate its state in class-level singletons: clear the previous
    # row's, as a fresh process would start (kohya refuses to set a strategy twice)
    for cls in vars(strategy_base).values():
        if isinstance(cls, type) and "_strategy" in vars(cls):
            cls._strategy = None
    AcceleratorState._reset_state(reset_partial_state=True)
    parser = script.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    clock = StepClock()
    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        if not clock.stamps:
            reset_memory()
            clock.start()
        else:
            clock.tick()
        return original(self, loss, **kwargs)

    accelerate.Accelerator.backward = backward
    try:
        trainer().train(args)
    finally:
        accelerate.Accelerator.backward = original
    return clock


def import_kohya() -> None:
    """kohya's source tree on sys.path, with the one shim transformers 5 needs."""
    import transformers

    try:  # renamed in transformers 5; kohya still imports it. Some 5.x releases raise ImportError here,
        transformers.CLIPFeatureExtractor  # not AttributeError, so hasattr() would propagate it
    except (AttributeError, ImportError):
        transformers.CLIPFeatureExtractor = transformers.CLIPImageProcessor
    if str(kohya_dir()) not in sys.path:
        sys.path.insert(0, str(kohya_dir()))


def main(argv=None):
    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("BENCH_WORK") or tempfile.mkdtemp(prefix="bench_kohya_"))
    for cfg in configs:
        reset_memory()
        try:
            pipe = pipeline_folder(root, cfg.model)
            data = image_folder(root, cfg.model, subfolder="10_subject").parent
            for stale in data.glob("*.npz"):
                stale.unlink()
            import_kohya()
            row = run_config(cfg, root, pipe, data)
        except BaseException as exc:  # noqa: BLE001 - kohya calls sys.exit on bad arguments
            if isinstance(exc, KeyboardInterrupt):
                raise
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        shutil.rmtree(root / "out", ignore_errors=True)
        emit(row)


if __name__ == "__main__":
    main()
