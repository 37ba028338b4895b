"""Our socket types, prefixed so they never collide with another pack's DATASET or LORA."""

from comfy_api.v0_0_2 import io

Dataset = io.Custom("INPLACE_DATASET")
LoRA = io.Custom("INPLACE_LORA")
CATEGORY = "LoRA Trainer"
