"""`torch_compile: true` on the Flux ComfyUI loaded (weight_dtype default and fp8_e4m3fn), through the
adapter the LoRA Trainer node picks: the blocks are compiled one kind at a time over ComfyUI's own
modules (aot_eager on the CPU), the run trains as the uncompiled one, and the host model hashes the
same afterwards, fp8 weights still fp8. The fp8 runs follow the default ones in the same process, with
no `torch._dynamo.reset()` between, as runs follow each other in a ComfyUI session, and still compile.
Runs flux_compile_probe.py in the ComfyUI venv (~7 min on 2 CPU cores: the tiny Flux is full width, and
each weight dtype trains twice)."""
import pytest

from comfy_workflows import run_probe


@pytest.fixture(scope="module")
def runs(comfy_python, tmp_path_factory):
    return run_probe(comfy_python, "flux_compile_probe.py", tmp_path_factory.mktemp("fc"), timeout=1800)


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_comfyuis_flux_trains_with_its_blocks_compiled(runs, weight_dtype):
    r = runs[weight_dtype]
    assert r["plain_said"] == [] and r["plain_graphs"] == 0
    assert len(r["said"]) == 1 and "double and single blocks are compiled" in r["said"][0], r["said"]
    # one double and one single block: one graph each, traced without a break (no fallback either)
    assert r["graphs"] == 2 and r["graph_breaks"] == {}
    assert r["shared_code_graphs"] == 0  # none kept on the block functions every run shares
    assert r["fast_steps"] == 2 and len(r["compiled_losses"]) == 2
    for a, b in zip(r["plain_losses"], r["compiled_losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (r["plain_losses"], r["compiled_losses"])
    assert r["same_keys"] and r["n_keys"] == 3 * 13 and r["up_moved"]
    assert r["max_weight_diff"] <= 1e-5
    assert r["hash_unchanged"]
    assert r["dtypes_after"] == (["torch.float8_e4m3fn"] if weight_dtype == "fp8_e4m3fn" else ["torch.float32"])
