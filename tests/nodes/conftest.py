"""Import the repository the way ComfyUI does: as a package (here `inplace_lora_pack`), so the
nodes' relative imports (`from ..engine import ...`) resolve. Only modules that do not import comfy
are unit-tested here; everything else runs against a real ComfyUI in tests/hosts/comfyui/."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "inplace_lora_pack"

if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
