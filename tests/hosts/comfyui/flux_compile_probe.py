"""Run with the ComfyUI venv's python: `torch_compile: true` on ComfyUI 0.3.75's own loaded Flux.

The tiny Flux (COMFY_TINY_T5_64, one double and one single block at full width) loaded by
`comfy.sd.load_diffusion_model` with weight_dtype default and fp8_e4m3fn, ComfyUI's Flux CLIP and VAE as
in flux_train_probe.py, goes through the adapter the LoRA Trainer node picks (nodes/comfy_adapter) and
trains 2 steps at 64 px with gradient checkpointing twice: the CUDA-graph step's body uncompiled, then
with `torch_compile: true`, its blocks compiled by Dynamo with the aot_eager backend (the CPU cannot be
trusted with inductor's kernels: engine/compiled_loss.py). Dynamo traces ComfyUI's own Linear modules
(and, for fp8, the engine's casts that take them over), so this is what shows that the compiled blocks
train the host's model as the plain ones do and leave it unchanged. Both weight dtypes train in this one
process, with no `torch._dynamo.reset()` between the runs, as runs follow each other in a ComfyUI session:
each run compiles its own graphs and drops them at its end (engine/compiled_loss.py). Prints one JSON.

    $COMFYUI_PYTHON tests/hosts/comfyui/flux_compile_probe.py WORK_DIR
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flux_train_probe import comfy_flux_inputs, model_hash  # noqa: E402


def train_twice(weight_dtype, folder, path, clip, vae, data):
    import torch

    import comfy.sd

    from inplace_pack.engine.config import TrainConfig
    from inplace_pack.engine.events import FunctionCallback
    from inplace_pack.engine.models import flux_forward
    from inplace_pack.engine.options import EngineOptions
    from inplace_pack.engine.train import train
    from inplace_pack.nodes.comfy_adapter import comfy_model

    options = {"dtype": torch.float8_e4m3fn} if weight_dtype == "fp8_e4m3fn" else {}
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(path, model_options=options)
    dm = model.model.diffusion_model
    before = model_hash(dm)
    results = {}
    for compiled in (False, True):
        adapter = comfy_model(model, clip, vae, name="flux_tiny.safetensors")
        cfg = TrainConfig(train_data_dir=data, output_dir=os.path.join(folder, f"out_{weight_dtype}_{compiled}"),
                          output_name="flux", resolution="64", batch_size=1, max_train_steps=2, lora_rank=4,
                          learning_rate=1e-2, seed=7, save_every_n_epochs=0, lr_scheduler="constant", warmup_steps=0,
                          gradient_checkpointing=True, cache_latents="memory", torch_compile=compiled)
        engine = EngineOptions(fast_step_without_graph=True, compile_backend="aot_eager",
                               compile_devices=("cuda", "cpu"))
        said = []
        torch._dynamo.utils.counters.clear()  # counts this run's graphs; what earlier runs compiled stays
        with torch.inference_mode(False), torch.enable_grad():
            result = train(cfg, adapter, options=engine, callbacks=[FunctionCallback(
                lambda e: said.append(e.message) if e.kind == "info" and "torch_compile" in (e.message or "") else None)])
        counters = torch._dynamo.utils.counters
        entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
        results[compiled] = {"shared_code_graphs": sum(len(entries(fn.__code__)) for fn in (
                                 flux_forward.double_block, flux_forward.single_block)),
                             "losses": [float(v) for v in result.losses], "fast_steps": result.fast_steps,
                             "tensors": result.tensors, "said": said,
                             "graphs": counters["stats"]["unique_graphs"],
                             "graph_breaks": {k: v for k, v in counters["graph_break"].items()}}
        del adapter
    plain, comp = results[False], results[True]
    diff = max(float((plain["tensors"][k].float() - comp["tensors"][k].float()).abs().max()
                     / plain["tensors"][k].float().abs().max().clamp_min(1e-12)) for k in plain["tensors"])
    return {"plain_losses": plain["losses"], "compiled_losses": comp["losses"], "max_weight_diff": diff,
            "same_keys": sorted(plain["tensors"]) == sorted(comp["tensors"]), "n_keys": len(comp["tensors"]),
            "up_moved": any(float(v.abs().sum()) > 0 for k, v in comp["tensors"].items() if k.endswith("lora_up.weight")),
            "fast_steps": comp["fast_steps"], "said": comp["said"], "plain_said": plain["said"],
            "graphs": comp["graphs"], "plain_graphs": plain["graphs"], "graph_breaks": comp["graph_breaks"],
            "shared_code_graphs": comp["shared_code_graphs"],
            "hash_unchanged": before == model_hash(dm),
            "dtypes_after": sorted({str(p.dtype) for p in dm.parameters()})}


def main(folder):
    paths, clip, vae, data = comfy_flux_inputs(folder)
    print(json.dumps({w: train_twice(w, folder, paths["model"], clip, vae, data)
                      for w in sys.argv[2:] or ("default", "fp8_e4m3fn")}))


if __name__ == "__main__":
    main(sys.argv[1])
