"""kohya sd-scripts `flux_train_network.py` on Flux.1-dev, run in-process with its own arguments.

Tools `kohya` and `kohya-fp8` (`--fp8_base`: the frozen Flux stored in fp8_e4m3fn, computed under
bf16 autocast) on model `flux1`. kohya reads four files (flux1-dev, clip_l, t5xxl, ae); writing 35 GB of
random weights would cost more device time than the rows, so its four loaders
(`library.flux_utils.load_flow_model / load_clip_l / load_t5xxl / load_ae`, and the key scan
`analyze_checkpoint_state`) are replaced by ones that build the same classes kohya builds with random
weights (workload_flux.build_random); everything after loading is kohya's. Tokenizers come from
`--tokenizer_cache_dir` (the engine's CLIP-L tokenizer, ComfyUI's T5 one). Arguments follow kohya's
Flux guide (docs/flux_train_network.md, "Recommended Settings"): `--network_module networks.lora_flux
--network_dim 16 --network_alpha 8 --mixed_precision bf16 --sdpa --network_train_unet_only
--optimizer_type AdamW --cache_latents --cache_text_encoder_outputs --guidance_scale 1.0
--timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw`, T5 512 tokens,
no block swapping, `--gradient_checkpointing` as the row asks. Timed at each `accelerator.backward`.

    KOHYA_DIR=/path/to/sd-scripts python -m bench.peer_kohya_flux --configs '[...]'
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .common import ALPHA, RANK, SEED, SMOKE_RES, WORKLOADS, emit, error_row, finish_row, log, parse_configs, reset_memory
from .peer_kohya import import_kohya, train_timed
from .workload import image_folder
from .workload_flux import MODEL, build_random, dims, t5_tokenizer_folder, text_tokens, tiny_t5_config


def patch_loaders() -> None:
    """kohya's file loaders -> the same kohya/transformers classes with random weights, on the GPU."""
    from dataclasses import replace

    from library import flux_models, flux_utils

    d = dims()
    load_clip_l, load_t5xxl = flux_utils.load_clip_l, flux_utils.load_t5xxl
    if getattr(flux_utils, "_bench_patched", False):
        return

    def flow_model(ckpt_path, dtype, device, disable_mmap=False, model_type="flux"):
        params = replace(flux_models.configs["dev"].params, hidden_size=d.hidden, num_heads=d.heads, depth=d.depth,
                         depth_single_blocks=d.depth_single, vec_in_dim=d.vec_in, context_in_dim=d.context_in)
        return False, build_random(lambda: flux_models.Flux(params))  # bf16: --fp8_base then casts it, as for a bf16 file

    def clip_l(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
        return build_random(lambda: load_clip_l(None, None, "cpu", state_dict={}), dtype=dtype)

    def t5xxl(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
        if not SMOKE_RES:
            return build_random(lambda: load_t5xxl(None, None, "cpu", state_dict={}), dtype=dtype)
        from transformers import T5Config, T5EncoderModel

        cfg = dict(load_t5xxl(None, None, "cpu", state_dict={}).config.to_dict(), **tiny_t5_config())
        return build_random(lambda: T5EncoderModel(T5Config(**cfg)), dtype=dtype)

    def ae(ckpt_path, dtype, device, disable_mmap=False):
        return build_random(lambda: flux_models.AutoEncoder(flux_models.configs["dev"].ae_params), dtype=dtype)

    flux_utils.load_flow_model, flux_utils.load_clip_l, flux_utils.load_t5xxl, flux_utils.load_ae = \
        flow_model, clip_l, t5xxl, ae
    flux_utils.analyze_checkpoint_state = lambda path: (False, False, (d.depth, d.depth_single), [path])
    flux_utils._bench_patched = True


def prepare(root: Path) -> dict[str, str]:
    """Placeholder model paths (the patched loaders never read them) and the tokenizer cache."""
    from transformers import T5TokenizerFast

    from engine.models.clip_tokenizer import clip_tokenizer

    paths = {}
    for name in ("flux1-dev", "clip_l", "t5xxl_fp16", "ae"):
        paths[name] = str(root / f"{name}.safetensors")
        Path(paths[name]).touch()
    toks = root / "tokenizers"
    if not (toks / "google_t5-v1_1-xxl").exists():
        clip_tokenizer().save_pretrained(str(toks / "openai_clip-vit-large-patch14"))
        T5TokenizerFast.from_pretrained(t5_tokenizer_folder()).save_pretrained(str(toks / "google_t5-v1_1-xxl"))
    return paths


def kohya_args(cfg, root: Path, paths: dict[str, str], data: Path) -> list[str]:
    w = WORKLOADS[cfg.model]
    args = ["--pretrained_model_name_or_path", paths["flux1-dev"], "--clip_l", paths["clip_l"],
            "--t5xxl", paths["t5xxl_fp16"], "--ae", paths["ae"], "--train_data_dir", str(data),
            "--output_dir", str(root / "out"), "--output_name", "bench", "--resolution", str(SMOKE_RES or w["resolution"]),
            "--train_batch_size", str(cfg.batch), "--max_train_steps", str(cfg.warmup + cfg.steps + 1),
            "--network_module", "networks.lora_flux", "--network_dim", str(RANK), "--network_alpha", str(ALPHA),
            "--mixed_precision", "bf16", "--save_precision", "bf16", "--sdpa", "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--seed", str(SEED),
            "--tokenizer_cache_dir", str(root / "tokenizers"), "--caption_extension", ".txt",
            "--save_every_n_epochs", "100000", "--cache_latents", "--cache_text_encoder_outputs",
            "--max_data_loader_n_workers", "0", "--guidance_scale", "1.0", "--timestep_sampling", "shift",
            "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
            "--t5xxl_max_token_length", str(text_tokens())]
    if cfg.gradient_checkpointing:
        args += ["--gradient_checkpointing"]
    if cfg.tool == "kohya-fp8":
        args += ["--fp8_base"]
    return args


def run_config(cfg, root: Path, paths: dict[str, str], data: Path):
    import flux_train_network as script

    patch_loaders()
    clock = train_timed(script, script.FluxNetworkTrainer, kohya_args(cfg, root, paths, data))
    notes = ["fp8_base: Flux weights fp8_e4m3fn, bf16 autocast"] if cfg.tool == "kohya-fp8" else []
    return finish_row(cfg, clock.step_times(cfg.warmup), cfg.batch, notes=notes)


def main(argv=None):
    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("BENCH_WORK") or tempfile.mkdtemp(prefix="bench_kohya_flux_"))
    root.mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        reset_memory()
        if cfg.model != MODEL or not cfg.cached:
            emit(error_row(cfg, f"not measured: {__name__} runs {MODEL} with cached latents and text only"))
            continue
        try:
            import_kohya()
            paths = prepare(root)
            data = image_folder(root, cfg.model, subfolder="10_subject").parent
            for stale in data.glob("*.npz"):
                stale.unlink()
            row = run_config(cfg, root, paths, data)
        except BaseException as exc:  # noqa: BLE001 - kohya calls sys.exit on bad arguments
            if isinstance(exc, KeyboardInterrupt):
                raise
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        shutil.rmtree(root / "out", ignore_errors=True)
        emit(row)


if __name__ == "__main__":
    main()
