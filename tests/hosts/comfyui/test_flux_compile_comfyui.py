"""`torch_compile: true` on the Flux ComfyUI loaded (weight_dtype default and fp8_e4m3fn), through the
adapter the LoRA Trainer node picks: the blocks are compiled one kind at a time over ComfyUI's own
modules (aot_eager on the CPU), the run trains as the uncompiled one, and the host model hashes the
same afterwards, fp8 weights still fp8. Runs flux_compile_probe.py in the ComfyUI venv (~7 min on 2
CPU cores: the tiny Flux is full width, and each weight dtype trains twice)."""
import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def runs(comfy_python, tmp_path_factory):
    out = subprocess.run([comfy_python, os.path.join(HERE, "flux_compile_probe.py"), str(tmp_path_factory.mktemp("fc"))],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_comfyuis_flux_trains_with_its_blocks_compiled(runs, weight_dtype):
    r = runs[weight_dtype]
    assert r["plain_said"] == [] and r["plain_graphs"] == 0
    assert len(r["said"]) == 1 and "double and single blocks are compiled" in r["said"][0], r["said"]
    # one double and one single block: one graph each, traced without a break (no fallback either)
    assert r["graphs"] == 2 and r["graph_breaks"] == {}
    assert r["fast_steps"] == 2 and len(r["compiled_losses"]) == 2
    for a, b in zip(r["plain_losses"], r["compiled_losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (r["plain_losses"], r["compiled_losses"])
    assert r["same_keys"] and r["n_keys"] == 3 * 13 and r["up_moved"]
    assert r["max_weight_diff"] <= 1e-5
    assert r["hash_unchanged"]
    assert r["dtypes_after"] == (["torch.float8_e4m3fn"] if weight_dtype == "fp8_e4m3fn" else ["torch.float32"])
