"""Flux.1 as a family: the same settings give kohya's keys and shapes (kohya's own `create_network` output
in fixtures/kohya_keys/flux1*.txt), the file's metadata is kohya's for Flux, the flow objective draws sigma
by kohya's formulas and feeds dev's guidance input, and the forward packs latents as Flux expects."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.lora.metadata import build_metadata
from engine.lora.targets import build_network
from engine.model import ModelInfo, TrainableModel
from engine.models.flux_forward import image_ids, pack, unpack
from engine.models.flux_model import FluxTransformer
from engine.models.flux_tiny import FLUX1_DEV
from engine.objectives import FlowObjective
from engine.objectives.flow import flux_mu

FIXTURES = Path(__file__).parent / "fixtures" / "kohya_keys"


class MetaFlux(TrainableModel):
    """Full-size flux1-dev and CLIP-L on the meta device: only the layer tree matters for keys."""

    def __init__(self, dims=FLUX1_DEV):
        from transformers import CLIPTextConfig, CLIPTextModel

        self.info = ModelInfo(family="flux1", variant="dev", layout=None)
        self.device, self.dtype = torch.device("meta"), torch.bfloat16
        with torch.device("meta"):
            self.transformer = FluxTransformer(dims)
            self.clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                       num_attention_heads=12, projection_dim=768))

    def unet_layers(self):
        return ((n, m) for n, m in self.transformer.named_modules() if isinstance(m, nn.Linear))

    def text_encoder_layers(self):
        wrap = "" if hasattr(self.clip_l, "text_model") else "text_model."  # transformers >= 5.6 flattened it
        return (("lora_te1", wrap + n, m) for n, m in self.clip_l.named_modules() if isinstance(m, nn.Linear))

    def trainable_roots(self):
        return [self.transformer, self.clip_l]

    def objective(self):
        return FlowObjective(sampling="flux_shift", guidance=1.0)

    encode_images = encode_text = predict = None


@pytest.fixture(scope="module")
def meta_flux():
    return MetaFlux()


def _fixture(case):
    rows = {}
    for line in (FIXTURES / f"{case}.txt").read_text().splitlines():
        name, down, up = line.split()
        rows[name] = (tuple(map(int, down.split(","))), tuple(map(int, up.split(","))))
    return rows


# kohya: --network_dim 16 --network_alpha 8 [--network_args train_blocks=... | per-type dims 0]
CASES = {"flux1": dict(), "flux1_double": dict(target_modules="double"), "flux1_single": dict(target_modules="single"),
         "flux1_attn": dict(target_modules="attention"), "flux1_te": dict(train_text_encoder=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_and_shapes_match_kohya(meta_flux, case):
    network = build_network(meta_flux, TrainConfig(lora_rank=16, lora_alpha=8, **CASES[case]))
    ours = {key: (tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)) for key, m in network.loras.items()}
    kohya = _fixture(case)
    assert sorted(set(kohya) - set(ours)) == [] and sorted(set(ours) - set(kohya)) == []
    assert {k: v for k, v in ours.items() if v != kohya[k]} == {}
    assert {float(m.alpha) for m in network.loras.values()} == {8.0}


def test_a_list_of_suffixes_adds_the_embedders_as_kohyas_in_dims(meta_flux):
    network = build_network(meta_flux, TrainConfig(target_modules=["img_in", "txt_in", "time_in.in_layer"]))
    assert sorted(network.loras) == ["lora_unet_img_in", "lora_unet_time_in_in_layer", "lora_unet_txt_in"]
    in_dims = {k for k in _fixture("flux1_in_dims") if not k.startswith("lora_unet_double") and "single" not in k}
    assert set(network.loras) <= in_dims


@pytest.mark.parametrize("preset", ["locon", ["to_q", "to_v"]])
def test_an_sd_preset_on_flux_is_refused_naming_the_flux_presets(meta_flux, preset):
    with pytest.raises(ConfigError) as e:
        build_network(meta_flux, TrainConfig(target_modules=preset))
    assert "kohya, double, single, attention" in str(e.value)


def test_a_flux_preset_on_sd_is_refused():
    from engine.models import full_size_model

    with pytest.raises(ConfigError, match="not a SD1.x preset"):
        build_network(full_size_model("sd1"), TrainConfig(target_modules="double"))


@pytest.mark.parametrize("variant, arch", [("dev", "flux-1-dev/lora"), ("schnell", "flux-1-schnell/lora")])
def test_metadata_is_kohyas_for_flux(variant, arch):
    cfg = TrainConfig(guidance_scale=1.0)
    md = build_metadata(cfg, ModelInfo(family="flux1", variant=variant, layout=None), data_summary={}, steps=1,
                        epoch=1, total_steps=1, batches_per_epoch=1, started_at=0.0, mixed_precision="bf16")
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == arch
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["modelspec.resolution"] == "1024x1024" and "modelspec.prediction_type" not in md
    assert md["ss_timestep_sampling"] == "flux_shift" and md["ss_model_prediction_type"] == "raw"
    assert md["ss_v2"] == "False" and md["ss_model_type"] == variant
    assert ("ss_guidance_scale" in md) == (variant == "dev")


def _draw(sampling, shape=(3, 16, 64, 96), guidance=1.0, **cfg):
    cfg = TrainConfig(timestep_sampling=sampling, **cfg)
    objective = FlowObjective(sampling="flux_shift", guidance=guidance).for_training(cfg, torch.device("cpu"))
    drawn = objective.draw(torch.zeros(shape), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=g)  # the noise is drawn first
    return drawn, g


def test_sigma_draws_follow_kohyas_formulas():
    drawn, g = _draw("uniform")
    assert torch.equal(drawn["sigma"], torch.rand(3, generator=g))
    drawn, g = _draw("sigmoid", sigmoid_scale=1.5)
    assert torch.allclose(drawn["sigma"], torch.sigmoid(1.5 * torch.randn(3, generator=g)))
    drawn, g = _draw("shift", discrete_flow_shift=3.1582)
    s = torch.sigmoid(torch.randn(3, generator=g))
    assert torch.allclose(drawn["sigma"], s * 3.1582 / (1 + 2.1582 * s))
    drawn, g = _draw("auto")  # Flux's own: flux_shift, mu from the 2x2-patch count (32 x 48 patches here)
    s = torch.sigmoid(torch.randn(3, generator=g))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (32 * 48 - 256)
    assert flux_mu(32 * 48) == pytest.approx(mu)
    assert torch.allclose(drawn["sigma"], math.exp(mu) / (math.exp(mu) + (1 / s - 1)))


def test_dev_is_told_the_configured_guidance_and_schnell_none():
    drawn, _ = _draw("auto", guidance_scale=2.5)
    assert torch.equal(drawn["cond.guidance"], torch.full((3,), 2.5))
    drawn, _ = _draw("auto", guidance=None)
    assert "cond.guidance" not in drawn


def test_latents_pack_into_2x2_patches_with_row_column_ids():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 6, 64)
    # kohya/diffusers: "b c (h ph) (w pw) -> b (h w) (c ph pw)"
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(unpack(tokens, 4, 6), x)
    ids = image_ids(1, 4, 6, "cpu")[0]
    assert ids[:, 0].eq(0).all() and ids[4].tolist() == [0, 1, 1] and ids[5].tolist() == [0, 1, 2]


def test_a_kohya_flux_config_reads_with_its_meaning(tmp_path):
    from engine.config import load_config

    path = tmp_path / "flux.toml"
    path.write_text('network_module = "networks.lora_flux"\nnetwork_dim = 16\nnetwork_alpha = 1\n'
                    'network_args = ["train_blocks=single"]\ntimestep_sampling = "shift"\n'
                    'discrete_flow_shift = 3.1582\nguidance_scale = 1.0\nmodel_prediction_type = "raw"\n'
                    'weighting_scheme = "uniform"\nclip_l = "clip_l.safetensors"\nt5xxl = "t5xxl.safetensors"\n'
                    'ae = "ae.safetensors"\n', encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.target_modules, cfg.lora_rank, cfg.lora_alpha) == ("single", 16, 1.0)
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift, cfg.guidance_scale) == ("shift", 3.1582, 1.0)
    assert cfg.weighting_scheme == "none"
    assert (cfg.ae, cfg.clip_l, cfg.t5xxl) == ("ae.safetensors", "clip_l.safetensors", "t5xxl.safetensors")

    path.write_text(path.read_text().replace('"raw"', '"sigma_scaled"'), encoding="utf-8")
    with pytest.raises(ConfigError, match="model_prediction_type = 'sigma_scaled' is not supported here: Flux.1"):
        load_config(path)
