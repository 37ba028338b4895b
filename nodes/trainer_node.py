"""LoRA Trainer: trains on the MODEL/CLIP/VAE already loaded in ComfyUI and hands back the LoRA.

The node's inputs map one to one onto TrainConfig fields (engine/config.py), plus an `advanced` box
that takes any other field as YAML (`noise_offset: 0.05`). Checkpoints go under ComfyUI's output
folder (`output/lora_trainer/<name>/`), so Cancel keeps them and `resume` continues the run.
Outputs: the LoRA (kohya tensors + metadata), MODEL and CLIP with it applied at strength 1 through
ComfyUI's own LoRA loader, and the loss curve.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from comfy_api.v0_0_2 import io, ui

from ..engine.config import OPTIMIZERS, SCHEDULERS, TARGET_PRESETS, TrainConfig
from ..engine.errors import ConfigError
from .io_types import CATEGORY, Dataset, LoRA
from .values import DatasetSpec, LoRAWeights

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
PREVIEW_STEPS = TrainConfig.__dataclass_fields__["sample_steps"].default  # the config field's default
_LOADER_KEYS = ("ckpt_name", "unet_name", "model_name")


def checkpoint_name(prompt: dict | None, node_id: str | None) -> str:
    """The file name of the checkpoint feeding this node's MODEL input, followed through LoRA loaders."""
    if not prompt or node_id is None:
        return ""
    node = prompt.get(str(node_id), {})
    link = node.get("inputs", {}).get("model")
    for _ in range(16):
        if not isinstance(link, list) or not link:
            return ""
        src = prompt.get(str(link[0]), {})
        inputs = src.get("inputs", {})
        for key in _LOADER_KEYS:
            if isinstance(inputs.get(key), str):
                return Path(inputs[key]).stem
        link = inputs.get("model")
    return ""


def mixed_precision(choice: str, model) -> str:
    """The engine's mixed_precision for a node choice; `auto` follows the dtype ComfyUI loaded."""
    import torch

    if choice == "fp32":
        return "no"
    if choice != "auto":
        return choice
    if model.device.type != "cuda":
        return "no"
    if model.dtype == torch.float16:
        return "fp16"
    if model.dtype == torch.bfloat16 or torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16"


def check_resolution(cfg, info, family_name: str) -> None:
    """Refuse SDXL-sized training on SD1/SD2 (a workflow's settings kept after swapping the checkpoint)."""
    w, h = cfg.resolution_wh(info.resolution)
    if info.spec.oversized(w, h, info.resolution):
        raise ConfigError(f"the dataset's resolution {w}x{h} is an SDXL-sized setting, but the MODEL is "
                          f"{family_name} (trained at {info.resolution} px). Set resolution to "
                          f"{info.resolution} (or auto) in Load Dataset, or load an SDXL checkpoint.")


def parse_advanced(text: str) -> dict:
    import yaml

    if not str(text or "").strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the 'advanced' box is not valid YAML ({exc}); write one 'key: value' per line, "
                          f"e.g. noise_offset: 0.05") from None
    if not isinstance(data, dict):
        raise ConfigError("the 'advanced' box must hold 'key: value' lines, e.g. noise_offset: 0.05")
    return data


class LoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InplaceLoRA_Trainer", display_name="LoRA Trainer", category=CATEGORY,
            description="Train a LoRA on the loaded checkpoint, in place: no second copy, the model is left "
                        "exactly as it was. Cancel keeps a checkpoint; 'resume' continues from it. Runs when "
                        "something uses its output (Save LoRA, a preview of the loss), so a graph whose Save "
                        "LoRA is misconfigured is refused before any training starts.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"), Dataset.Input("dataset"),
                io.String.Input("name", default="my_lora", tooltip="Run name: checkpoints go to "
                                "output/lora_trainer/<name>/."),
                io.Int.Input("steps", default=500, min=0, max=1_000_000, tooltip="Optimizer steps; 0 = use epochs."),
                io.Int.Input("epochs", default=10, min=1, max=10_000),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5, tooltip="0 = rank/2."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-5, round=1e-7),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW"),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="cosine"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto follows the loaded model (fp16/bf16 on GPU, fp32 on CPU)."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Much less memory, ~35% slower."),
                io.Boolean.Input("train_text_encoder", default=False),
                io.Combo.Input("target_layers", options=list(TARGET_PRESETS), default="kohya",
                               tooltip="kohya: attention + feed-forward; attention: q/k/v/out only; "
                               "locon: also the ResNet convs."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Same seed, same run: a fixed seed keeps ComfyUI from retraining on every Queue."),
                io.String.Input("preview_prompt", default="", multiline=True, tooltip="One prompt per line "
                                "([trigger] = the trigger word); empty = no previews."),
                io.Int.Input("preview_every_n_steps", default=0, min=0, max=100_000,
                             tooltip="0 = one preview at the end."),
                io.Int.Input("checkpoint_every_n_steps", default=0, min=0, max=100_000,
                             tooltip="0 = every epoch (the last 3 are kept)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue from the last checkpoint of this name."),
                io.String.Input("advanced", default="", multiline=True, tooltip="Any other setting as YAML, "
                                "e.g. noise_offset: 0.05, or max_token_length: 150 for long tag lists "
                                "(python -m engine train --help-config lists them)."),
                LoRA.Input("init_lora", optional=True, tooltip="Start from these LoRA weights."),
                io.Int.Input("preview_steps", default=PREVIEW_STEPS, min=1, max=1000, optional=True,
                             tooltip="Sampling steps of each preview, the end-of-run one included."),
            ],
            outputs=[LoRA.Output(display_name="LORA"), io.Model.Output(display_name="MODEL"),
                     io.Clip.Output(display_name="CLIP"), io.Image.Output(display_name="loss")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def build_config(cls, model, dataset: DatasetSpec, **k):
        import folder_paths

        values = {
            **dataset.config_values(),
            "output_dir": str(Path(folder_paths.get_output_directory()) / "lora_trainer"),
            "output_name": k["name"].strip(), "max_train_steps": k["steps"], "epochs": k["epochs"],
            "lora_rank": k["rank"], "lora_alpha": k["alpha"], "learning_rate": k["learning_rate"],
            "batch_size": k["batch_size"], "gradient_accumulation_steps": k["grad_accumulation"],
            "optimizer": k["optimizer"], "lr_scheduler": k["scheduler"],
            "mixed_precision": mixed_precision(k["precision"], model),
            "gradient_checkpointing": k["gradient_checkpointing"], "train_text_encoder": k["train_text_encoder"],
            "target_modules": k["target_layers"], "seed": k["seed"],
            "sample_prompts": [ln.strip() for ln in k["preview_prompt"].splitlines() if ln.strip()],
            "sample_every_n_steps": k["preview_every_n_steps"], "save_steps": k["checkpoint_every_n_steps"],
            "resume_from_checkpoint": "latest" if k["resume"] else "",
            **({"sample_steps": k["preview_steps"]} if k.get("preview_steps") is not None else {}),
            "clip_skip": model.info.clip_skip or 0,
        }
        if k.get("init_lora") is not None:
            if k["init_lora"].path is None:
                raise ConfigError("init_lora has no file on disk; save it with Save LoRA and load it again.")
            values["network_weights"] = str(k["init_lora"].path)
        values.update(parse_advanced(k["advanced"]))
        return TrainConfig.from_dict(values, source="LoRA Trainer")

    @classmethod
    def execute(cls, model, clip, vae, dataset: DatasetSpec, name, steps, epochs, rank, alpha, learning_rate,
                batch_size, grad_accumulation, optimizer, scheduler, precision, gradient_checkpointing,
                train_text_encoder, target_layers, seed, preview_prompt, preview_every_n_steps,
                checkpoint_every_n_steps, resume, advanced, init_lora=None, preview_steps=None):
        settings = {k: v for k, v in locals().items() if k not in ("cls", "model", "clip", "vae", "dataset")}
        import comfy.model_management
        import comfy.sd
        import torch

        from ..engine.train import train
        from .comfy_adapter import comfy_model
        from .plot import loss_plot, pil_to_image_tensor
        from .progress import NodeProgress

        node_id = cls.hidden.unique_id
        adapter = comfy_model(model, clip, vae, name=checkpoint_name(cls.hidden.prompt, node_id))
        cfg = cls.build_config(adapter, dataset, **settings)
        check_resolution(cfg, adapter.info, adapter.family_name)
        progress = NodeProgress(node_id, cfg.output_name, Path(cfg.output_dir) / cfg.output_name)
        started = time.monotonic()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = train(cfg, adapter, callbacks=[progress],
                               stop_exceptions=(comfy.model_management.InterruptProcessingException,))
        finally:
            del adapter
            gc.collect()
            comfy.model_management.soft_empty_cache()
        seconds = time.monotonic() - started
        lora = LoRAWeights(cfg.output_name, result.tensors, result.metadata, result.lora_path,
                           preview=progress.last_preview, steps=result.steps)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora.tensors, 1.0, 1.0)
        points = progress.points
        plot = loss_plot([p[1] for p in points], [p[2] for p in points], title=f"{cfg.output_name}: loss",
                         validation=result.validation)
        summary = "\n".join([lora.describe(), f"file: {result.lora_path}",
                             f"{seconds:.0f} s in all, {progress.seconds_per_step():.2f} s/step"] + progress.messages)
        return io.NodeOutput(lora, model_out, clip_out, pil_to_image_tensor(plot), ui=ui.PreviewText(summary))
