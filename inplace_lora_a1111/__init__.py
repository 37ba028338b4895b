"""In-Place LoRA Trainer for the AUTOMATIC1111 WebUI and Forge (Forge, Forge Neo, reForge, Forge Classic).

The WebUI imports `scripts/inplace_lora_trainer.py` with the extension folder on `sys.path`; that
file imports this package, which imports the repository's `engine` package. Both stay in
`sys.modules`, so later (lazy) imports resolve after the WebUI restores `sys.path`. The package name
is unique on purpose: WebUI extensions share one module namespace.
"""

from pathlib import Path

import engine

_ROOT = Path(__file__).resolve().parent.parent
if Path(engine.__file__).resolve().parent.parent != _ROOT:
    raise ImportError(f"another extension or package provides a top-level 'engine' module ({engine.__file__}); "
                      f"In-Place LoRA Trainer needs its own ({_ROOT / 'engine'}). Disable the other extension "
                      f"or report the clash.")
