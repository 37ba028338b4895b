"""The standalone training runs whose results are recorded in fixtures/recorded_runs.json (the engine as
it is) and fixtures/redesign_parity.json (the engine before the redesign; see tests/parity_fixture.py).

Each run trains a tiny SD1, SD2 (v-prediction) or SDXL model built in code for three steps with a fixed
seed. Together they cover the plain step and the fast step (the CUDA-graph step's body, run without a
graph on the CPU), min-SNR, noise offset, zero-terminal-SNR, text-encoder training, long captions,
gradient checkpointing and every target preset (kohya, attention, locon, a suffix list). How runs are
compared and re-recorded: tests/parity_fixture.py.
"""

from __future__ import annotations

from pathlib import Path

from engine.lora.kohya_io import read_lora
from engine.models import tiny_sd1, tiny_sd2, tiny_sdxl
from engine.train import train
from tests.parity_fixture import CURRENT, PRE_REDESIGN, one_thread, result_record

from train_fixtures import FAST_ON_CPU, quick_config

FIXTURE, PRE_REDESIGN_FIXTURE = (Path(__file__).parent / "fixtures" / name for name in (CURRENT, PRE_REDESIGN))

BUILD = {"sd1": lambda: tiny_sd1(), "sd1-ztsnr-v": lambda: tiny_sd1(prediction_type="v_prediction",
                                                                     zero_terminal_snr=True),
         "sd2-v": lambda: tiny_sd2(prediction_type="v_prediction"), "sdxl": lambda: tiny_sdxl()}

# name -> (model, fast step, config changes); every run: 3 steps, batch 2, rank 4, seed 7
RUNS: dict[str, tuple[str, bool, dict]] = {
    "sd1_plain": ("sd1", False, dict(min_snr_gamma=0.0)),
    "sd1_fast_offset_snr": ("sd1", True, dict(noise_offset=0.05, min_snr_gamma=5.0)),
    "sd1_te_suffixes": ("sd1", False, dict(train_text_encoder=True, noise_offset=0.05,
                                           target_modules=["to_q", "to_v", "q_proj", "fc1"])),
    "sd1_fast_gc_locon": ("sd1", True, dict(gradient_checkpointing=True, target_modules="locon", conv_rank=2)),
    "sd1_ztsnr_v": ("sd1-ztsnr-v", False, dict(min_snr_gamma=5.0)),
    "sd2v_plain": ("sd2-v", False, dict(min_snr_gamma=5.0)),
    "sd2v_fast_offset": ("sd2-v", True, dict(noise_offset=0.1, min_snr_gamma=5.0)),
    "sd2v_te_locon": ("sd2-v", False, dict(train_text_encoder=True, target_modules="locon")),
    "sdxl_plain": ("sdxl", False, dict(min_snr_gamma=0.0)),
    "sdxl_fast_attention": ("sdxl", True, dict(noise_offset=0.05, min_snr_gamma=5.0, target_modules="attention")),
    "sdxl_te_long": ("sdxl", False, dict(train_text_encoder=True, max_token_length=150, min_snr_gamma=5.0)),
}


def run(name: str, data: Path, out: Path) -> dict:
    """Train run `name` and return its record (see tests/parity_fixture.py)."""
    family, fast, changes = RUNS[name]
    opts = dict(max_train_steps=3, batch_size=2, lora_rank=4, seed=7, lr_scheduler="cosine", warmup_steps=1,
                **changes)
    cfg = quick_config(data, out, **opts)
    with one_thread():
        result = train(cfg, BUILD[family](), options=FAST_ON_CPU if fast else None)
    tensors, metadata = read_lora(result.lora_path)
    return result_record(result.losses, tensors, metadata, fast=result.fast_steps > 0)
