"""The ComfyExtension ComfyUI gets from `comfy_entrypoint()`: our nodes, model folders and routes."""

from __future__ import annotations

import logging
import os

from comfy_api.v0_0_2 import ComfyExtension, io

logger = logging.getLogger("inplace_lora_trainer")


def register_model_folders() -> None:
    """models/wd14_tagger and models/captioners, where Auto Caption looks for captioning models."""
    import folder_paths

    from .dataset_nodes import CAPTIONER_FOLDERS

    for name in CAPTIONER_FOLDERS:
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


class InplaceLoRAExtension(ComfyExtension):
    _loaded = False

    async def on_load(self) -> None:
        """Idempotent: ComfyUI 0.3.75 never calls on_load, so comfy_entrypoint does; later ones may too."""
        if InplaceLoRAExtension._loaded:
            return
        InplaceLoRAExtension._loaded = True
        register_model_folders()
        try:
            from .progress import register_routes

            register_routes()
        except Exception as exc:  # no server (scripts, tests): the nodes still work
            logger.info("In-Place LoRA Trainer: history route not registered (%s)", exc)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .dataset_nodes import AutoCaption, LoadDataset
        from .lora_nodes import LoadLoRAForTraining, PreviewStrengths, SaveLoRA
        from .trainer_node import LoRATrainer

        return [LoadDataset, AutoCaption, LoRATrainer, SaveLoRA, PreviewStrengths, LoadLoRAForTraining]
