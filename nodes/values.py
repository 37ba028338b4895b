"""The values that travel between our nodes: a dataset description and a trained LoRA.

`DatasetSpec` is what LoadDataset decided (folders, captions, repeats, resolution) expressed as
TrainConfig fields, so the trainer builds its config from it and nothing else. `LoRAWeights` carries
kohya tensors and header metadata in memory, plus the file they were written to (checkpoints and
`network_weights` need a path). Plain dataclasses: no comfy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    repeats: int = 1
    resolution: str = "auto"
    enable_bucket: bool = True
    trigger_word: str = ""
    caption_extension: str = ".txt"
    metadata_path: str = ""
    reg_folder: str = ""
    image_count: int = 0
    report: str = ""
    captions: tuple[tuple[str, str], ...] = ()  # (file name, caption) as training will read them
    mask_folder: str = ""  # the MASK input written as one PNG per image (masked loss), or ""

    def config_values(self) -> dict[str, Any]:
        """The TrainConfig fields this dataset sets."""
        return {"train_data_dir": self.folder, "repeats": self.repeats, "resolution": self.resolution,
                "enable_bucket": self.enable_bucket, "trigger_word": self.trigger_word,
                "caption_extension": self.caption_extension, "metadata_path": self.metadata_path,
                "reg_data_dir": self.reg_folder,
                **({"conditioning_data_dir": self.mask_folder, "masked_loss": True} if self.mask_folder else {})}

    def with_captions(self, **changes: Any) -> "DatasetSpec":
        return replace(self, **changes)


@dataclass
class LoRAWeights:
    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None  # a file holding exactly these weights
    preview: Any = None  # a PIL image to save beside the file, when there is one
    steps: int = 0

    @property
    def modules(self) -> int:
        return sum(k.endswith(".lora_down.weight") for k in self.tensors)

    @property
    def trains_text_encoder(self) -> bool:
        return any(k.startswith("lora_te") for k in self.tensors)

    def describe(self) -> str:
        base = self.metadata.get("ss_base_model_version", "unknown base")
        rank = self.metadata.get("ss_network_dim", "?")
        te = " + text encoder" if self.trains_text_encoder else ""
        return f"{self.name}: {self.modules} modules{te}, rank {rank}, {base}, {self.steps} steps"
