"""The CLIP text-encoder kit of the SD families: which encoder layers get a LoRA, and their names.

Adapters hand the engine each encoder's Linear layers under transformers' CLIPTextModel names
(`text_model.encoder.layers.0.self_attn.q_proj`, `...mlp.fc1`) whatever the host calls them; kohya
keys are those names under the encoder's prefix (`lora_te1_text_model_encoder_layers_0_mlp_fc1`).
Presets as kohya's `networks/lora.py`: q/k/v/out_proj and fc1/fc2 of every layer (72 modules for
SD1.5's CLIP-L, 264 for SDXL's two encoders); "attention" keeps the projections; a list of name
suffixes picks exactly those.
"""

from __future__ import annotations

import re

from torch import nn

from .unet import matches_suffix

# CLIP's two padding ids: SD1.x and SDXL's first encoder pad with <|endoftext|>, SD2.x and SDXL's second
# encoder with "!" (id 0), as OpenCLIP does (engine/models/clip_tokenizer.py pads with them)
EOS_ID, BANG_ID = 49407, 0
_TE_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TE_MLP = re.compile(r"\.mlp\.(fc1|fc2)$")


def select_clip_layer(name: str, module: nn.Module, preset) -> bool:
    """Whether the text-encoder layer `name` (HF CLIP style) gets a LoRA under `preset`."""
    if not isinstance(module, nn.Linear):
        return False
    if isinstance(preset, (list, tuple)):
        return matches_suffix(name, preset)
    if preset == "attention":
        return bool(_TE_ATTN.search(name))
    return bool(_TE_ATTN.search(name) or _TE_MLP.search(name))


def kohya_te_key(prefix: str, hf_name: str) -> str:
    """`("lora_te1", "text_model.encoder.layers.0.mlp.fc1")` -> `lora_te1_text_model_encoder_layers_0_mlp_fc1`."""
    return f"{prefix}_{hf_name.replace('.', '_')}"
