"""The repository root is ComfyUI's entry point; importing it anywhere else must cost nothing and
never fail (the CLI, the A1111 extension and these tests import it without ComfyUI installed)."""
import inspect
import subprocess
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_root_package_imports_without_comfyui_or_torch():
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('pack', r'{ROOT / '__init__.py'}', "
            f"submodule_search_locations=[r'{ROOT}']); m = importlib.util.module_from_spec(s); "
            "sys.modules['pack'] = m; s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'comfy' not in sys.modules; print(m.WEB_DIRECTORY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "./web"


def test_entry_point_is_the_v3_coroutine_and_the_web_folder_exists():
    import inplace_lora_pack as pack

    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "ComfyUI would use V1 mappings and ignore comfy_entrypoint"
    assert (ROOT / "web" / "inplace_lora.js").is_file()
