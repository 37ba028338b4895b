"""The two callbacks `scripts/inplace_lora_trainer.py` registers with the WebUI.

`on_ui_tabs` adds the "LoRA Trainer" tab (not in the Train tab: Forge has none); `on_app_started` adds the
HTTP routes, also under --nowebui where there is no UI (`demo` is None then).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
TAB_TITLE = "LoRA Trainer"
TAB_ID = "inplace_lora_trainer"


def on_ui_tabs():
    from .ui import build_tab

    return [(build_tab(), TAB_TITLE, TAB_ID)]


def on_app_started(demo, app) -> None:
    from .api import register

    paths = register(app)
    logger.info("LoRA Trainer routes: %s", ", ".join(paths))
