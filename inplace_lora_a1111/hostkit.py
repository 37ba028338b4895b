"""The host-neutral helpers the Forge adapter shares with the ComfyUI adapter, in one import.

Forge keeps its UNet and CLIP the ComfyUI way (LDM names, `clip_l`/`clip_g` holders, weights loaded
as inference tensors), so the Forge adapter uses engine/hostkit as the ComfyUI adapter does.
"""

from __future__ import annotations

from engine.hostkit.borrowing import borrowed_weights, clip_backprop_guard, state_fingerprint, unet_blocks
from engine.hostkit.clip_holders import text_encoder_layers, text_encoders
from engine.hostkit.ldm_names import layout_from_ldm_names, layout_from_unet_config, unet_layers

__all__ = ["layout_from_ldm_names", "layout_from_unet_config", "unet_layers", "text_encoders",
           "text_encoder_layers", "borrowed_weights", "clip_backprop_guard", "unet_blocks", "state_fingerprint"]
