"""Save LoRA (kohya), Load LoRA for Training and Preview LoRA Strengths.

Save LoRA writes into `models/loras` (the first `loras` folder ComfyUI knows), so LoraLoader lists the
file at once and A1111/Forge read it with `<lora:name:0.8>`. Preview LoRA Strengths samples one column
per strength with the same seed through ComfyUI's own sampler and LoRA loader, so what it shows is what
LoraLoader + KSampler give; the strength-0 column is the base model itself.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.v0_0_2 import io, ui

from ..engine.errors import UserError
from .io_types import CATEGORY, LoRA
from .values import LoRAWeights


def loras_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InplaceLoRA_SaveLoRA", display_name="Save LoRA (kohya)", category=CATEGORY, is_output_node=True,
            description="Write the LoRA into models/loras as a kohya .safetensors (ss_* metadata, preview PNG). "
                        "An existing file is never replaced unless 'overwrite' is on: a numbered name is used.",
            inputs=[
                LoRA.Input("lora"),
                io.String.Input("name", default="my_lora", tooltip="File name, optionally in a subfolder "
                                "(styles/my_style); it stays inside models/loras."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name. Loaders "
                                 "that already read it may keep the old weights until ComfyUI restarts."),
                io.Image.Input("preview", optional=True, tooltip="Image saved beside the file as "
                               "<name>.preview.png (default: the trainer's last preview)."),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="prompt_tag")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        from .lora_files import check_name

        if name is not None:
            try:
                check_name(name)
            except UserError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, lora: LoRAWeights, name, overwrite, preview=None):
        from .lora_files import prompt_tag, write_lora

        image = None
        if preview is not None:
            from PIL import Image

            image = Image.fromarray((preview[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
        path, rel = write_lora(loras_root(), name, lora, overwrite=overwrite, preview=image)
        tag = prompt_tag(path)
        text = f"saved {path}\nLoraLoader: {rel}\nA1111/Forge prompt: {tag}"
        return io.NodeOutput(rel, tag, ui=ui.PreviewText(text))


class LoadLoRAForTraining(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="InplaceLoRA_LoadLoRA", display_name="Load LoRA for Training", category=CATEGORY,
            description="A LoRA file from models/loras, to continue training it (LoRA Trainer's init_lora) "
                        "or to compare strengths.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"))],
            outputs=[LoRA.Output(display_name="LORA")],
        )

    @classmethod
    def execute(cls, lora_name):
        import folder_paths

        from ..engine.lora.kohya_io import read_lora

        path = Path(folder_paths.get_full_path_or_raise("loras", lora_name))
        tensors, metadata = read_lora(path)
        steps = int(metadata.get("ss_steps", "0") or 0) if str(metadata.get("ss_steps", "0")).isdigit() else 0
        lora = LoRAWeights(path.stem, tensors, metadata, path, steps=steps)
        return io.NodeOutput(lora, ui=ui.PreviewText(lora.describe()))


def parse_strengths(text: str) -> list[float]:
    """"0, 0.5, 0.8, 1" -> [0.0, 0.5, 0.8, 1.0]; a UserError for anything else."""
    out = []
    for part in str(text).replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise UserError(f"strengths must be numbers separated by commas, like 0, 0.5, 0.8, 1.0; "
                            f"'{part.strip()}' is not a number.") from None
    if not out:
        raise UserError("give at least one strength, like 0, 0.5, 0.8, 1.0")
    return out


class PreviewStrengths(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="InplaceLoRA_PreviewStrengths", display_name="Preview LoRA Strengths", category=CATEGORY,
            description="One column per LoRA strength, same seed, one row per prompt line, sampled with "
                        "ComfyUI's own sampler and LoRA loader.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"), LoRA.Input("lora"),
                io.String.Input("prompt", default="a photo of [trigger]", multiline=True,
                                tooltip="One row per line; [trigger] becomes the LoRA's trigger word."),
                io.String.Input("negative", default="", multiline=True),
                io.String.Input("strengths", default="0, 0.5, 0.8, 1.0"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Int.Input("steps", default=20, min=1, max=10_000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, model, clip, vae, lora: LoRAWeights, prompt, negative, strengths, seed, steps, cfg,
                sampler_name, scheduler, width, height):
        import comfy.sd
        import nodes
        import torch

        from ..engine.sample import strength_grid
        from .progress import check_interrupt

        values = parse_strengths(strengths)
        trigger = lora.metadata.get("modelspec.trigger_phrase", "")
        prompts = [p.strip().replace("[trigger]", trigger) for p in prompt.splitlines() if p.strip()] or [""]
        channels = model.get_model_object("latent_format").latent_channels  # 4 for SD, 16 for Flux
        latent = {"samples": torch.zeros([1, channels, height // 8, width // 8])}
        columns, batch = [], []
        for strength in values:
            m, c = (model, clip) if strength == 0 else comfy.sd.load_lora_for_models(
                model, clip, lora.tensors, strength, strength)
            negative_cond = _encode(c, negative)
            column = []
            for text in prompts:
                check_interrupt()
                out = nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler, _encode(c, text),
                                            negative_cond, latent)[0]
                pixels = vae.decode(out["samples"])
                pixels = pixels.reshape(-1, *pixels.shape[-3:])[:1]
                batch.append(pixels)
                column.append(_to_pil(pixels[0]))
            columns.append(column)
        grid = strength_grid(columns, [f"strength {v:g}" for v in values])
        from .plot import pil_to_image_tensor

        images = torch.cat([b.float().cpu() for b in batch])
        return io.NodeOutput(pil_to_image_tensor(grid), images)


def _encode(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def _to_pil(pixels):
    from PIL import Image

    return Image.fromarray((pixels.float().clamp(0, 1) * 255).round().byte().cpu().numpy())
