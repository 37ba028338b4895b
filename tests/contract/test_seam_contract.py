"""The seam's promises (engine/model.py), checked on every adapter the CPU test box has (conftest.py):

- layers come named as the family's rules read them, so the same model gives the same kohya keys and
  shapes on every host;
- `encode_text` returns exactly the family's conditioning roles, in the shapes the denoiser takes, and
  `predict` answers with the input's shape;
- `objective()` is the family's kind, with the host's prediction type and the SD schedule;
- after a run (text encoder trained too), everything the host owns is bit-identical.
"""

import numpy as np
import torch

from conftest import fingerprint
from engine.config import TrainConfig
from engine.lora.targets import build_network
from engine.models import tiny_sd1, tiny_sd2, tiny_sdxl
from engine.objectives import scaled_linear_alphas_cumprod
from tests.engine.train_fixtures import pattern_dataset

LDM_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")
REFERENCE = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}  # the diffusers model every host wraps


def _saved_shapes(network, prefix: str) -> dict:
    """The keys and shapes the LoRA file gets (what loaders see)."""
    return {k: tuple(v.shape) for k, v in network.kohya_state_dict(None).items() if k.startswith(prefix)}


def test_layers_are_named_for_the_family_and_give_the_reference_keys(hosted):
    model = hosted.model
    spec = model.info.spec
    names = [name for name, _ in model.unet_layers()]
    assert names and not any(n.startswith(LDM_BLOCKS) for n in names), "the adapter left host (LDM) names"
    cfg = TrainConfig(target_modules="locon", train_text_encoder=True)
    network = build_network(model, cfg)
    reference = build_network(REFERENCE[model.info.family](), cfg)
    assert _saved_shapes(network, "lora_unet_") == _saved_shapes(reference, "lora_unet_")
    prefixes = {key.split("_text_model")[0] for key in network.loras if not key.startswith("lora_unet_")}
    assert prefixes == {te.kohya_prefix for te in spec.text_encoders}


def test_conditioning_has_the_familys_roles_and_predict_keeps_the_shape(hosted):
    model = hosted.model
    spec = model.info.spec
    with model.session(False, False), torch.no_grad():
        cond = model.encode_text(["a red square", "stripes"])
        assert set(cond) == set(spec.conditioning)
        context = cond["context"]
        assert context.dim() == 3 and context.shape[0] == 2 and context.shape[1] % 77 == 0
        if "pooled" in cond:
            assert cond["pooled"].dim() == 2 and cond["pooled"].shape[0] == 2
        for role in spec.batch_conditioning:  # SDXL's size ids come from the batch
            cond[role] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [64, 96, 0, 8, 64, 96]])
        noisy = torch.randn(2, 4, 8, 8)
        out = model.predict(noisy, torch.tensor([10, 900]), cond)
    assert out.shape == noisy.shape and torch.isfinite(out).all()


def test_objective_is_the_familys_with_the_hosts_prediction_type(hosted):
    model = hosted.model
    objective = model.objective()
    assert objective.kind == model.info.spec.objective == "ddpm"
    assert objective.prediction_type == model.info.prediction_type == hosted.prediction_type
    acp = objective.alphas_cumprod
    assert acp.dtype == torch.float32 and acp.device.type == "cpu" and acp.shape == (1000,)
    assert torch.allclose(acp, scaled_linear_alphas_cumprod(), atol=1e-6)


def test_the_host_is_bit_identical_after_a_run(hosted, tmp_path):
    # the host has used its model before (transformers adds its output-recording hooks to a CLIP at the
    # first forward that asks for hidden states: the host's doing, not the trainer's)
    with hosted.model.session(False, False), torch.no_grad():
        hosted.model.encode_text(["warm up"])
    before = fingerprint(hosted.roots)
    cfg = TrainConfig(train_data_dir=str(pattern_dataset(tmp_path / "data", n=2)), output_dir=str(tmp_path / "out"),
                      output_name="contract", resolution="64", batch_size=2, max_train_steps=2, lora_rank=4,
                      learning_rate=1e-2, save_every_n_epochs=0, save_precision="fp32", train_text_encoder=True,
                      gradient_checkpointing=hosted.checkpointing)
    result = hosted.train(cfg, hosted.model)
    assert fingerprint(hosted.roots) == before
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert any(v.abs().sum() > 0 for k, v in result.tensors.items() if k.endswith("lora_up.weight"))
