"""Given the same start, batches and random draws, kohya's training step moves the LoRA where ours does.

bench/quality.py compares whole runs, whose random draws (initial weights, batch order, noise, timesteps)
differ between the trainers even at the same seed. This test takes the draws out: our trainer runs the
bench's own config (bench.quality_runs.ours_config) for a few steps while its initial LoRA weights and
each step's batch and draws are recorded; kohya's own code (bench/quality_kohya_step.py: its argument
defaults, network, parameter groups, optimizer, schedule, noise scheduler and `process_batch`, under the
bench's own train_network.py arguments) replays them from the same initial weights. Any setting that
makes the two train differently (which layers, learning rate per group, alpha scaling, AdamW's betas, eps
or weight decay, clipping, schedule, timestep or noise use, v target, loss reduction, latent scale) moves
the weights apart by far more than the tolerance.
Needs a kohya sd-scripts environment (bench/README.md: KOHYA_PYTHON, KOHYA_DIR); collected only where
KOHYA_PYTHON is set (tests/conftest.py), so CI, which has none, neither runs it nor counts it as skipped."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.quality_runs import Recipe, kohya_args, kohya_env, lycoris_available, ours_config
from engine.demo import write_dataset
from engine.step import TrainingStep

ROOT = Path(__file__).resolve().parents[2]
RECIPE = Recipe(steps=4, every=100, batch=2, images=4, seed=3)


def _record_our_run(root: Path, monkeypatch, network_type: str) -> tuple[dict, Path]:
    from engine.models.demo_model import demo_model
    from engine.train import train

    recorded = {"initial": None, "steps": []}
    plain_loss = TrainingStep.loss

    def loss(self, tensors):
        if recorded["initial"] is None:  # the first step's forward: nothing has moved the weights yet
            recorded["initial"] = {k: v.clone() for k, v in self.network.kohya_state_dict(dtype=torch.float32).items()}
        recorded["steps"].append({"latents": tensors["latents"].detach().clone(),
                                  "context": tensors["cond.context"].detach().clone(),
                                  "loss_weights": tensors["loss_weights"].detach().clone(),
                                  "noise": tensors["noise"].detach().clone(), "t": tensors["t"].detach().clone()})
        return plain_loss(self, tensors)

    monkeypatch.setattr(TrainingStep, "loss", loss)
    result = train(ours_config(root, RECIPE, network_type, root / "ours"), demo_model())
    return recorded, result.lora_path


# LoHa, LoKr and DoRA: LyCORIS' own modules through kohya (LYCORIS_DIR, or LyCORIS installed for KOHYA_PYTHON)
TYPES = ["lora"] + (["loha", "lokr", "dora"] if lycoris_available() is None else [])


@pytest.mark.parametrize("network_type", TYPES)
def test_kohya_replaying_our_draws_ends_at_our_weights(tmp_path, monkeypatch, network_type):
    write_dataset(tmp_path / "train", n=RECIPE.images, seed=0)
    recorded, ours_file = _record_our_run(tmp_path, monkeypatch, network_type)
    assert len(recorded["steps"]) == RECIPE.steps
    torch.save(recorded, tmp_path / "recorded.pt")

    args = kohya_args(tmp_path, RECIPE, network_type, tmp_path / "kohya")
    out = subprocess.run([os.environ["KOHYA_PYTHON"], str(ROOT / "bench" / "quality_kohya_step.py"),
                          str(tmp_path / "recorded.pt"), str(tmp_path / "kohya.safetensors"), *args],
                         env=kohya_env(), cwd=os.environ["KOHYA_DIR"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    ours, theirs = load_file(str(ours_file)), load_file(str(tmp_path / "kohya.safetensors"))
    assert set(ours) == set(theirs)
    moved, worst = 0.0, 0.0
    for key, start in recorded["initial"].items():
        if key.endswith(".alpha"):
            assert float(ours[key]) == float(theirs[key]) == RECIPE.alpha
            continue
        ours_step, theirs_step = ours[key].float() - start, theirs[key].float() - start
        moved = max(moved, float(theirs_step.norm()))
        worst = max(worst, float((ours_step - theirs_step).norm() / theirs_step.norm().clamp_min(1e-12)))
        # float32 rounding only: the two compute the same sums in another order
        assert (ours_step - theirs_step).norm() <= 1e-3 * theirs_step.norm() + 1e-7, key
    print(f"largest relative difference of a weight's change: {worst:.2e}")  # shown with -s
    assert moved > 1e-3  # kohya's weights did move: the comparison is not of two untrained networks
