"""Flux.1 on the command line: `base_model` a BFL transformer file with `ae`, `clip_l` and `t5xxl` set
beside it (kohya's --ae/--clip_l/--t5xxl), all tiny files in the real layouts (flux_tiny's writers, CLIP
and T5 from transformers configs), trains through engine.train, also with fp8_base; a Flux file without
its text encoders is refused saying which keys to set; diffusers' Flux LoRA loader takes our file's keys
without unexpected ones."""

from dataclasses import replace

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import ModelError
from engine.models.flux_tiny import COMFY_TINY, MICRO, write_flux, write_flux_vae
from engine.train import train

from train_fixtures import pattern_dataset

DIMS = replace(MICRO, vec_in=64, context_in=32)  # CLIP-L stand-in 64 wide, T5 stand-in 32 wide
WORDS = ["stripes", "0", "1", "2", "3", "a", "photo"]


def _write_tiny_text_encoders(folder):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine.models.load import te_keys_for

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77, projection_dim=64))
    save_file({k: v.contiguous() for k, v in te_keys_for(clip, clip.state_dict(), wrapped=True).items()},
              str(folder / "clip_l.safetensors"))
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(folder / "t5xxl.safetensors"))  # tied to shared.weight, as T5 files store it
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "t5_tokenizer.json"))


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_files")
    write_flux(folder / "flux1-micro.safetensors", DIMS, dtype=torch.float32)
    write_flux_vae(folder / "ae.safetensors", ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
    _write_tiny_text_encoders(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("flux_data"), n=2)


def _config(files, data, out, **changes):
    values = dict(base_model=str(files / "flux1-micro.safetensors"), ae=str(files / "ae.safetensors"),
                  clip_l=str(files / "clip_l.safetensors"), t5xxl=str(files / "t5xxl.safetensors"),
                  t5xxl_tokenizer=str(files / "t5_tokenizer.json"), train_data_dir=str(data), output_dir=str(out),
                  output_name="flux", resolution="64", batch_size=2, max_train_steps=3, lora_rank=4,
                  learning_rate=1e-3, save_every_n_epochs=0, lr_scheduler="constant", warmup_steps=0, seed=3,
                  device="cpu", gradient_checkpointing=True, t5xxl_max_token_length=32)
    values.update(changes)
    return TrainConfig(**values)


def test_a_flux_lora_trains_from_local_files(flux_files, data, tmp_path):
    result = train(_config(flux_files, data, tmp_path, train_text_encoder=True))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    keys = {k.rsplit(".", 2)[0] for k in result.tensors}
    assert "lora_unet_double_blocks_1_img_attn_qkv" in keys and "lora_unet_single_blocks_0_linear1" in keys
    assert len([k for k in keys if k.startswith("lora_unet_")]) == 2 * 10 + 2 * 3
    assert len([k for k in keys if k.startswith("lora_te1_")]) == 2 * 6  # 2 CLIP layers: q/k/v/out, fc1/fc2
    assert result.metadata["ss_base_model_version"] == "flux1"
    assert result.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert result.metadata["ss_guidance_scale"] == "1.0"
    assert result.lora_path.is_file()


def test_the_flux_file_carries_the_flow_options_and_no_ddpm_ones(flux_files, data, tmp_path):
    """kohya's flux_train_network.py metadata (update_metadata) and none of the DDPM-only options, even at
    their defaults (min_snr_gamma 5)."""
    from engine.lora.kohya_io import read_lora

    cfg = _config(flux_files, data, tmp_path, max_train_steps=1, timestep_sampling="shift",
                  discrete_flow_shift=3.1582, guidance_scale=1.0)
    assert cfg.min_snr_gamma == 5.0
    _, md = read_lora(train(cfg).lora_path)
    assert (md["ss_timestep_sampling"], md["ss_discrete_flow_shift"]) == ("shift", "3.1582")
    assert (md["ss_guidance_scale"], md["ss_model_prediction_type"]) == ("1.0", "raw")
    ddpm_only = ("ss_min_snr_gamma", "ss_multires_noise_iterations", "ss_multires_noise_discount",
                 "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength", "modelspec.prediction_type")
    assert [k for k in ddpm_only if k in md] == []


def test_fp8_base_trains_with_fp8_linear_weights(flux_files, data, tmp_path):
    result = train(_config(flux_files, data, tmp_path, fp8_base=True, mixed_precision="bf16"))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.metadata["ss_fp8_base"] == "True"


@pytest.mark.parametrize("drop", ["ae", "clip_l", "t5xxl"])
def test_a_flux_file_without_its_encoders_is_refused_naming_the_keys(flux_files, data, tmp_path, drop):
    with pytest.raises(ModelError) as e:
        train(_config(flux_files, data, tmp_path, **{drop: ""}))
    assert drop in str(e.value) and "kohya's --ae, --clip_l, --t5xxl" in str(e.value)
    assert not (tmp_path / "flux").exists() or not any((tmp_path / "flux").glob("*.safetensors"))


def test_diffusers_flux_loader_takes_every_key_of_our_file(tmp_path):
    """diffusers converts kohya Flux keys for FluxTransformer2DModel (width 3072 only: it splits
    linear1 at 3072); every converted key must name a module of the model and nothing be left over."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    from engine.lora.kohya_io import read_lora, save_lora
    from engine.lora.targets import build_network
    from test_flux_family import MetaFlux

    network = build_network(MetaFlux(COMFY_TINY), TrainConfig(lora_rank=4, lora_alpha=2, train_text_encoder=True))
    tensors = network.kohya_state_dict()
    tensors = {k: (torch.randn_like(v.float()) if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}
    path = save_lora(tmp_path / "flux.safetensors", tensors, {"ss_base_model_version": "flux1"})
    converted = FluxLoraLoaderMixin.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    modules = {f"transformer.{n}" for n, _ in transformer.named_modules()}
    unet = [k for k in converted if k.startswith("transformer.")]
    te = [k for k in converted if k.startswith("text_encoder.")]
    assert len(unet) > 0 and len(te) == 2 * 72  # CLIP-L's 72 modules, lora_A and lora_B each
    assert sorted(k for k in converted if k not in unet and k not in te) == []
    unknown = sorted(k for k in unet if k.rsplit(".", 2)[0] not in modules)
    assert unknown == [], unknown[:5]
    # qkv split into to_q/k/v and linear1 into q/k/v + proj_mlp: every one of our 13 modules is there
    targets = {k.rsplit(".", 2)[0] for k in unet}
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
            "transformer.single_transformer_blocks.0.proj_mlp", "transformer.single_transformer_blocks.0.proj_out",
            "transformer.single_transformer_blocks.0.norm.linear"} <= targets
    assert len(read_lora(path)[0]) == len(tensors)


@pytest.mark.parametrize("changes, says", [
    (dict(clip_skip=2), "clip_skip is an SD setting"),
    (dict(prediction_type="v_prediction"), "prediction_type v_prediction is an SD setting"),
    (dict(resolution="1000"), "multiples of 16 px"),
    (dict(resolution="512", bucket_reso_steps=40), "bucket_reso_steps 40"),
    (dict(multires_noise_iterations=6), "multires_noise_iterations is an SD setting"),
])
def test_sd_options_and_odd_sizes_on_flux_are_refused_before_loading(flux_files, data, tmp_path, changes, says):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        train(_config(flux_files, data, tmp_path, **changes))


def test_the_flux_preset_config_reads_as_kohyas_guide():
    from pathlib import Path

    from engine.config_io import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "flux_style.yaml")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.fp8_base, cfg.mixed_precision) == (16, 1.0, True, "bf16")
    assert (cfg.timestep_sampling, cfg.guidance_scale, cfg.gradient_checkpointing) == ("flux_shift", 1.0, True)
    assert cfg.ae == cfg.clip_l == cfg.t5xxl == ""  # set per run, as base_model


def test_the_cached_t5_context_has_t5xxl_max_token_length_tokens(flux_files, data, tmp_path):
    """kohya's t5xxl_max_token_length is the length of every T5 context the run encodes and caches; 0
    (the default) is kohya's 512 for dev."""
    from engine.models.flux_adapter import load_flux

    cfg = _config(flux_files, data, tmp_path, max_train_steps=1, t5xxl_max_token_length=24)
    model = load_flux(cfg, flux_files / "flux1-micro.safetensors", device="cpu", dtype=torch.float32)
    assert model.encode_text(["a photo"])["context"].shape[1] == 512  # dev, before the run sets it
    lengths = []
    encode = model.encode_text

    def recording(captions):
        cond = encode(captions)
        lengths.append(cond["context"].shape[1])
        return cond

    model.encode_text = recording
    train(cfg, model)
    assert lengths and set(lengths) == {24}


def test_schnell_defaults_to_256_t5_tokens():
    from engine.families.flux1 import t5_tokens

    assert (t5_tokens(0, "schnell"), t5_tokens(0, "dev"), t5_tokens(300, "schnell")) == (256, 512, 300)
    assert TrainConfig.from_dict({"t5xxl_max_token_length": 128}).t5xxl_max_token_length == 128


def test_cli_flux_previews_show_the_lora_as_it_trains(flux_files, data, tmp_path):
    """sample_prompts / sample_every_n_steps on a Flux config: PNGs in the run's samples folder, made with
    the engine's Flux and the flow sampler at the run's sample_guidance; the same seed gives the same base
    image, another guidance another one, and the trained LoRA changes it."""
    import numpy as np
    from PIL import Image

    from engine.models.flux_adapter import load_flux

    cfg = _config(flux_files, data, tmp_path, max_train_steps=2, sample_prompts=["stripes --s 2"],
                  sample_every_n_steps=2, learning_rate=0.1, sample_guidance=2.0)
    model = load_flux(cfg, flux_files / "flux1-micro.safetensors", device="cpu", dtype=torch.float32)
    kw = dict(seed=cfg.sample_seed, steps=2, cfg=1.0, width=64, height=64)
    step0 = np.asarray(model.sample(["stripes"], guidance=2.0, **kw)[0])
    assert (step0 == np.asarray(model.sample(["stripes"], guidance=2.0, **kw)[0])).all()  # seeded
    assert not (step0 == np.asarray(model.sample(["stripes"], guidance=3.5, **kw)[0])).all()
    calls, sample = [], model.sample

    def recording(prompts, **options):
        calls.append(options)
        return sample(prompts, **options)

    model.sample = recording
    result = train(cfg, model)
    assert [(c["guidance"], c["cfg"], c["steps"], c["seed"]) for c in calls] == [(2.0, 1.0, 2, cfg.sample_seed)]
    pngs = sorted(p.name for p in (result.output_dir / "samples").glob("*.png"))
    assert pngs == ["step000002_00.png"]
    later = np.asarray(Image.open(result.output_dir / "samples" / "step000002_00.png"))
    assert later.shape == step0.shape == (64, 64, 3)
    assert np.abs(later.astype(int) - step0.astype(int)).max() > 8  # (the random tiny VAE damps it)


def test_the_flow_sampler_follows_kohyas_shifted_schedule():
    import math

    from engine.objectives.flow_sampler import euler_flow, flux_schedule

    sigmas = flux_schedule(4, 256)  # mu = 0.5 at 256 tokens
    t = torch.linspace(1, 0, 5, dtype=torch.float64)
    expected = math.exp(0.5) / (math.exp(0.5) + (1 / t - 1))
    assert torch.allclose(sigmas, expected) and (sigmas[0], sigmas[-1]) == (1.0, 0.0)
    # a constant velocity v carries x from sigma 1 to 0 by -v, whatever the schedule
    x = euler_flow(lambda x, s: torch.ones_like(x), torch.zeros(1, 4), sigmas)
    assert torch.allclose(x, -torch.ones(1, 4))
