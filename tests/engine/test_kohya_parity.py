"""Our LoRA files have exactly the modules and shapes kohya sd-scripts writes for the same model.

The oracle is kohya's own `networks.lora.create_network` run on its full-size SD1.5/SD2/SDXL models;
its output is stored as data in fixtures/kohya_keys/ (see the README there for how it was made).
A key or shape that differs means A1111/ComfyUI/kohya would drop or reject part of a user's LoRA.
"""

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from engine.config import TrainConfig
from engine.lora.targets import build_network
from engine.models import full_size_model

FIXTURES = Path(__file__).parent / "fixtures" / "kohya_keys"
FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
# (text-encoder modules, U-Net modules) as kohya logs them ("create LoRA for ...: N modules")
KOHYA_COUNTS = {"sd15": (72, 192), "sd15_locon": (72, 278), "sd2": (138, 192), "sd2_locon": (138, 278),
                "sdxl": (264, 722), "sdxl_locon": (264, 788)}


def _kohya_fixture(case: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    rows = {}
    for line in (FIXTURES / f"{case}.txt").read_text(encoding="utf-8").splitlines():
        name, down, up = line.split()
        rows[name] = (tuple(map(int, down.split(","))), tuple(map(int, up.split(","))))
    return rows


@lru_cache(maxsize=None)
def _model(family: str):
    return full_size_model(family)  # meta weights; build_network only reads the layer tree


def _config(case: str) -> TrainConfig:
    # kohya: --network_dim 16 --network_alpha 8 [--network_args conv_dim=8 conv_alpha=4]
    if case.endswith("_locon"):
        return TrainConfig(lora_rank=16, lora_alpha=8, train_text_encoder=True, target_modules="locon",
                           conv_rank=8, conv_alpha=4)
    return TrainConfig(lora_rank=16, lora_alpha=8, train_text_encoder=True)


def _saved_modules(case: str):
    """{module: (down shape, up shape, alpha)} of the file our trainer would write."""
    network = build_network(_model(FAMILY[case.split("_")[0]]), _config(case))
    sd = network.kohya_state_dict()  # what save_lora writes (fp16)
    modules = {}
    for key in network.loras:
        modules[key] = (tuple(sd[f"{key}.lora_down.weight"].shape), tuple(sd[f"{key}.lora_up.weight"].shape),
                        float(sd[f"{key}.alpha"]))
    assert len(sd) == 3 * len(modules)  # nothing but down/up/alpha per module
    return network, modules


@pytest.mark.parametrize("case", sorted(KOHYA_COUNTS))
def test_keys_and_shapes_match_kohya(case):
    kohya = _kohya_fixture(case)
    te, unet = KOHYA_COUNTS[case]
    assert sum(k.startswith("lora_te") for k in kohya) == te and sum(k.startswith("lora_unet") for k in kohya) == unet

    _, ours = _saved_modules(case)
    missing, extra = sorted(set(kohya) - set(ours)), sorted(set(ours) - set(kohya))
    assert not missing and not extra, f"kohya has {len(missing)} modules we lack (e.g. {missing[:3]}), " \
                                      f"we have {len(extra)} kohya lacks (e.g. {extra[:3]})"
    wrong = [(k, ours[k][:2], kohya[k]) for k in sorted(kohya) if ours[k][:2] != kohya[k]]
    assert not wrong, f"{len(wrong)} shapes differ from kohya's, e.g. {wrong[:3]}"
    # kohya: network_alpha for Linear and 1x1 convs, conv_alpha for the 3x3 convs (LoCon)
    for key, (down, _, alpha) in ours.items():
        spatial = len(down) == 4 and down[2:] != (1, 1)
        assert alpha == (4.0 if spatial else 8.0), key


def test_sd2_reads_both_kohya_layouts_of_proj_in_out():
    """kohya writes SD2's proj_in/out as 1x1 convs (single-file checkpoint) or Linear (diffusers folder);
    continuing training from either must load every module with its values."""
    network, _ = _saved_modules("sd2")
    torch.manual_seed(0)
    with torch.no_grad():
        for module in network.loras.values():
            module.lora_up.weight.normal_()
    conv_layout = network.kohya_state_dict(dtype=None)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert conv_layout[f"{key}.lora_down.weight"].shape == (16, 320, 1, 1)
    linear_layout = {k: (v.flatten(1) if v.dim() == 4 and v.shape[2:] == (1, 1) else v) for k, v in conv_layout.items()}
    assert linear_layout[f"{key}.lora_down.weight"].shape == (16, 320)

    for file_tensors in (conv_layout, linear_layout):
        fresh = build_network(_model("sd2"), _config("sd2"))
        loaded, unused = fresh.load_kohya_state_dict(file_tensors)
        assert len(loaded) == len(network.loras) == 330 and not unused
        assert torch.equal(fresh.loras[key].lora_up.weight, network.loras[key].lora_up.weight)
        assert fresh.kohya_state_dict(dtype=None)[f"{key}.lora_down.weight"].shape == (16, 320, 1, 1)


def test_metadata_session_id_and_modelspec_version_as_kohya_writes():
    """kohya's ss_session_id is an integer (metadata tools parse it with int()), shared by every save
    of a run; its modelspec version is 1.0.1."""
    from engine.lora.metadata import build_metadata
    from engine.model import ModelInfo

    def save(step):
        return build_metadata(TrainConfig(), ModelInfo(family="sd1"), data_summary={}, steps=step, epoch=1,
                              total_steps=2, batches_per_epoch=2, started_at=0.0, mixed_precision="fp16",
                              session_id="3fa9c1d2e4")

    first, second = save(1), save(2)
    assert 0 <= int(first["ss_session_id"]) < 2**32 and first["ss_session_id"] == second["ss_session_id"]
    assert first["modelspec.sai_model_spec"] == "1.0.1"
