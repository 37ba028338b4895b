"""Flux.1 as people share it, on the command line: a diffusers folder (transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer_2/) and an all-in-one checkpoint (ComfyUI's Load Checkpoint layout) load into
the same engine FluxModel as the BFL files do and train. diffusers' transformer keys are converted to
BFL's: a tiny FluxTransformer2DModel built here gives the same output as the engine's forward over the
converted weights. A folder or file that lacks a part is refused, naming it and the key that supplies it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import ModelError
from engine.models.flux_forward import flux_forward, image_ids, pack, unpack
from engine.train import train

from test_flux_cli import _config, data, flux_files  # noqa: F401  (fixtures)


def _diffusers_transformer(seed=0, guidance=True):
    """A FluxTransformer2DModel of engine width 256 (head dim 128, Flux's rope axes), 2 + 2 blocks, for the
    test files' CLIP (64 wide) and T5 (32 wide); weights drawn so every layer matters."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=64, guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _diffusers_velocity(model, x, sigma, context, pooled, guidance):
    b, _, h, w = x.shape
    out = model(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                img_ids=image_ids(1, h, w, "cpu")[0], txt_ids=torch.zeros(context.shape[1], 3), guidance=guidance,
                return_dict=False)[0]
    return unpack(out, h, w)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 8, 6, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32, generator=g),
            torch.randn(2, 64, generator=g), torch.tensor([3.5, 1.0]))


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_flux_keys_convert_to_bfl_with_the_same_output(guidance):
    from engine.models.flux_load import transformer_from_state_dict

    reference = _diffusers_transformer(guidance=guidance)
    ours = transformer_from_state_dict(reference.state_dict(), torch.float32)
    assert hasattr(ours, "guidance_in") == guidance and len(ours.double_blocks) == len(ours.single_blocks) == 2
    x, sigma, context, pooled, g = _inputs()
    g = g if guidance else None
    with torch.no_grad():
        expected = _diffusers_velocity(reference, x, sigma, context, pooled, g)
        got = flux_forward(ours, x, sigma, context, pooled, g)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def _t5_tokenizer(flux_files):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(flux_files / "t5_tokenizer.json"), pad_token="<pad>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def diffusers_folder(flux_files, tmp_path_factory):
    """A FLUX.1 diffusers folder as published, tiny: every component saved by its own class."""
    from diffusers import AutoencoderKL

    from engine.models.flux_load import load_clip_l, load_t5
    from engine.models.flux_tiny import flux_vae_config

    folder = tmp_path_factory.mktemp("FLUX.1-micro")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
    _diffusers_transformer().save_pretrained(str(folder / "transformer"))
    torch.manual_seed(0)
    AutoencoderKL(**flux_vae_config(tiny=True)).save_pretrained(str(folder / "vae"))
    load_clip_l(flux_files / "clip_l.safetensors").save_pretrained(str(folder / "text_encoder"))
    load_t5(flux_files / "t5xxl.safetensors").save_pretrained(str(folder / "text_encoder_2"))
    _t5_tokenizer(flux_files).save_pretrained(str(folder / "tokenizer_2"))
    return folder


def _only_base(flux_files, data, out, base, **changes):
    """A run on `base` alone: no ae / clip_l / t5xxl files beside it unless `changes` sets them."""
    values = dict(base_model=str(base), ae="", clip_l="", t5xxl="", t5xxl_tokenizer="", max_train_steps=1)
    return _config(flux_files, data, out, **{**values, **changes})


def test_a_diffusers_flux_folder_loads_as_its_transformer_computes_and_trains(diffusers_folder, flux_files, data,
                                                                               tmp_path):
    from engine.models.flux_adapter import load_flux

    cfg = _only_base(flux_files, data, tmp_path, diffusers_folder)
    model = load_flux(cfg, diffusers_folder, device="cpu", dtype=torch.float32)
    x, sigma, context, pooled, g = _inputs()
    with torch.no_grad():
        expected = _diffusers_velocity(_diffusers_transformer(), x, sigma, context, pooled, g)
        got = model.predict(x, sigma, {"context": context, "pooled": pooled, "guidance": g})
    assert torch.allclose(got, expected, atol=1e-5)
    assert model.encode_text(["stripes"])["context"].shape == (1, 512, 32)  # T5 from text_encoder_2/, tokenizer_2/
    result = train(cfg)
    assert result.steps == 1 and result.metadata["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight" in result.tensors


@pytest.fixture(scope="module")
def all_in_one(flux_files, tmp_path_factory):
    """flux1-micro + ae + clip_l + t5xxl in one file under ComfyUI's Load Checkpoint prefixes."""
    parts = {"flux1-micro": "model.diffusion_model.", "ae": "vae.", "clip_l": "text_encoders.clip_l.transformer.",
             "t5xxl": "text_encoders.t5xxl.transformer."}
    tensors = {}
    for name, prefix in parts.items():
        with safe_open(str(flux_files / f"{name}.safetensors"), "pt") as f:
            tensors.update({prefix + k: f.get_tensor(k) for k in f.keys()})
    path = tmp_path_factory.mktemp("aio") / "flux1-micro-aio.safetensors"
    save_file(tensors, str(path))
    _t5_tokenizer(flux_files).save_pretrained(str(path.parent))  # beside the checkpoint
    return path, tensors


def test_an_all_in_one_checkpoint_loads_every_part_from_the_file_and_trains(all_in_one, flux_files, data, tmp_path):
    from engine.models.flux_adapter import load_flux

    path, tensors = all_in_one
    cfg = _only_base(flux_files, data, tmp_path, path)
    model = load_flux(cfg, path, device="cpu", dtype=torch.float32)
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(value, tensors["model.diffusion_model." + key]), key
    t5 = model.t5.state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert torch.equal(t5, tensors["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert model.encode_text(["stripes"])["context"].shape == (1, 512, 32)
    result = train(cfg)
    assert result.steps == 1 and result.lora_path.is_file()


def test_a_part_set_in_the_config_supplies_what_the_checkpoint_lacks(all_in_one, flux_files, data, tmp_path):
    path, tensors = all_in_one
    no_t5 = tmp_path / "flux1-no-t5.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.t5xxl.")}, str(no_t5))
    with pytest.raises(ModelError, match=r"t5xxl.*kohya's --ae, --clip_l, --t5xxl"):
        train(_only_base(flux_files, data, tmp_path / "a", no_t5))
    cfg = _only_base(flux_files, data, tmp_path / "b", no_t5, t5xxl=str(flux_files / "t5xxl.safetensors"),
                     t5xxl_tokenizer=str(flux_files / "t5_tokenizer.json"))
    assert train(cfg).steps == 1


def test_a_diffusers_folder_without_a_part_names_the_folder_and_the_key(diffusers_folder, flux_files, data,
                                                                         tmp_path):
    import shutil

    partial = tmp_path / "FLUX.1-partial"
    shutil.copytree(diffusers_folder, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelError, match=r"lacks text_encoder_2/.*t5xxl \(the T5-XXL text encoder\)"):
        train(_only_base(flux_files, data, tmp_path / "out", partial))
    for weights in (partial / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match="has no transformer/\\*.safetensors"):
        train(_only_base(flux_files, data, tmp_path / "out", partial, t5xxl=str(flux_files / "t5xxl.safetensors")))


def test_a_folder_that_is_neither_flux_nor_sd_says_what_base_model_takes(flux_files, data, tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ModelError, match="not a diffusers model"):
        train(_only_base(flux_files, data, tmp_path / "out", folder))
