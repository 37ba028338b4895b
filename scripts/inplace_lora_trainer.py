"""A1111/Forge entry point: registers the "LoRA Trainer" tab and the /inplace-lora/v1 API routes.

The code lives in the `inplace_lora_a1111` package beside this folder; nothing here is a
`scripts.Script`, so nothing is added to txt2img/img2img.
"""

from modules import script_callbacks

from inplace_lora_a1111 import webui_entry

script_callbacks.on_ui_tabs(webui_entry.on_ui_tabs)
script_callbacks.on_app_started(webui_entry.on_app_started)
