"""Family detection and the errors a user sees for files we do not train on."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelError
from engine.models.checkpoint_file import read_state_dict, safetensors_header
from engine.models.detect import detect_checkpoint, detect_folder, detect_path
from engine.models.prediction import resolve_prediction_type, sd2_test_forward

U = "model.diffusion_model."
VAE = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
       "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}


def sd_shapes(ctx, te_keys, *, in_ch=4, channels=320, adm=None):
    shapes = {U + "input_blocks.0.0.weight": (channels, in_ch, 3, 3),
              U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (channels, ctx),
              U + "out.2.weight": (4, channels, 3, 3), **VAE, **te_keys}
    if adm:
        shapes[U + "label_emb.0.0.weight"] = (1280, adm)
    return shapes


CLIP_L = {"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}
OPEN_CLIP = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}
SDXL_TE = {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
           "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280)}


@pytest.mark.parametrize("shapes, family", [
    (sd_shapes(768, CLIP_L), "sd1"),
    (sd_shapes(1024, OPEN_CLIP), "sd2"),
    (sd_shapes(2048, SDXL_TE, adm=2816), "sdxl"),
    (sd_shapes(1024, {"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}),
     "sd2"),  # SD2 saved in sgm layout
])
def test_detects_the_three_families(shapes, family):
    det = detect_checkpoint(shapes, "model.safetensors")
    assert det.family == family and det.standard
    assert not det.v_pred_marker


def test_v_pred_and_ztsnr_markers_are_read():
    shapes = {**sd_shapes(2048, SDXL_TE, adm=2816), "v_pred": (0,), "ztsnr": (0,)}
    det = detect_checkpoint(shapes, "noob.safetensors")
    assert det.v_pred_marker and det.ztsnr
    assert resolve_prediction_type("auto", det, path=None) == "v_prediction"
    assert resolve_prediction_type("epsilon", det, path=None) == "epsilon"  # the config wins


@pytest.mark.parametrize("shapes, words", [
    (sd_shapes(1280, {"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280)},
               channels=384, adm=2560), ["SDXL refiner", "SDXL base"]),
    (sd_shapes(768, CLIP_L, in_ch=9), ["SD1.x inpainting", "9 input channels"]),
    (sd_shapes(2048, SDXL_TE, in_ch=9, adm=2816), ["SDXL inpainting"]),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)},
     ["Flux checkpoint", "SD1.x, SD2.x and SDXL"]),
    ({U + "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)}, ["SD3"]),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (16, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 16)}, ["LoRA", "network_weights"]),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, ["VAE on its own"]),
    ({**sd_shapes(768, CLIP_L), "edm_mean": (1, 4, 1, 1)}, ["Playground"]),
    ({"blocks.0.cross_attn.q_linear.weight": (1152, 1152), "t_block.1.weight": (6912, 1152)}, ["PixArt"]),
    ({"emb_params": (4, 768)}, ["textual-inversion"]),
])
def test_refuses_what_it_does_not_train_with_a_clear_message(shapes, words):
    with pytest.raises(ModelError) as err:
        detect_checkpoint(shapes, "thing.safetensors")
    for word in words:
        assert word in str(err.value)
    assert "thing.safetensors" in str(err.value)


def test_missing_text_encoder_or_vae_is_named():
    no_vae = {k: v for k, v in sd_shapes(768, CLIP_L).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="without a VAE"):
        detect_checkpoint(no_vae, "x.safetensors")
    no_te = sd_shapes(768, {})
    with pytest.raises(ModelError, match="without its text encoder"):
        detect_checkpoint(no_te, "x.safetensors")


def write_safetensors(path, tensors):
    save_file(tensors, str(path))
    return path


def test_truncated_safetensors_says_download_again(tmp_path):
    path = write_safetensors(tmp_path / "cut.safetensors", {"a": torch.zeros(1000), "b": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ModelError, match="truncated.*download it again"):
        safetensors_header(path)
    with pytest.raises(ModelError, match="truncated"):
        detect_path(path)


def test_html_page_and_lfs_pointer_and_garbage_are_recognised(tmp_path):
    html = tmp_path / "model.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>" + b" " * 100)
    with pytest.raises(ModelError, match="web page"):
        detect_path(html)
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelError, match="Git LFS pointer"):
        detect_path(lfs)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"x" * 64)
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        detect_path(junk)


def test_lora_file_passed_as_base_model(tmp_path):
    path = write_safetensors(tmp_path / "my lora 角色.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)})
    with pytest.raises(ModelError, match="LoRA.*not a base model"):
        detect_path(path)


class _Evil:
    pass


def test_ckpt_with_python_objects_is_refused_not_executed(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": _Evil()}, path)
    with pytest.raises(ModelError, match="refused because loading it could run arbitrary code"):
        read_state_dict(path)


def test_truncated_ckpt_and_plain_ckpt(tmp_path):
    good = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "global_step": 10}, good)
    assert torch.equal(read_state_dict(good)["w"], torch.arange(4.0))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelError, match="truncated or damaged"):
        read_state_dict(cut)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="GGUF"):
        detect_path(path)


def _folder(tmp_path, cls, unet_cfg, scheduler=None, subdirs=("text_encoder",)):
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    (root / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    for sub in subdirs:
        (root / sub).mkdir()
    if scheduler:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


def test_diffusers_folders(tmp_path):
    sd2v = _folder(tmp_path / "a", "StableDiffusionPipeline",
                   {"cross_attention_dim": 1024, "in_channels": 4, "block_out_channels": [320]},
                   {"prediction_type": "v_prediction"})
    det = detect_folder(sd2v)
    assert det.family == "sd2" and det.scheduler_prediction_type == "v_prediction"
    assert resolve_prediction_type("auto", det) == "v_prediction"
    xl = _folder(tmp_path / "b", "StableDiffusionXLPipeline",
                 {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "block_out_channels": [320]},
                 subdirs=("text_encoder", "text_encoder_2"))
    assert detect_folder(xl).family == "sdxl"
    flux = _folder(tmp_path / "c", "FluxPipeline", {})
    with pytest.raises(ModelError, match="Flux diffusers model"):
        detect_folder(flux)
    refiner = _folder(tmp_path / "d", "StableDiffusionXLImg2ImgPipeline",
                      {"cross_attention_dim": 1280, "addition_embed_type": "text_time"}, subdirs=("text_encoder_2",))
    with pytest.raises(ModelError, match="SDXL refiner"):
        detect_folder(refiner)
    plain = tmp_path / "e"
    plain.mkdir()
    (plain / "realistic.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="pass that file"):
        detect_folder(plain)


def test_sidecar_yaml_decides_sd2_like_a1111(tmp_path):
    det = detect_checkpoint(sd_shapes(1024, OPEN_CLIP))
    ckpt = tmp_path / "v2-1_768.safetensors"
    ckpt.write_bytes(b"")
    (tmp_path / "v2-1_768.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert resolve_prediction_type("auto", det, path=ckpt) == "v_prediction"


class _FakeUNet(torch.nn.Module):
    """Stands in for an SD2 UNet: returns x + offset, like the probe's v / eps cases."""

    def __init__(self, offset):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.offset = offset
        self.config = type("C", (), {"cross_attention_dim": 1024, "in_channels": 4})()

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        assert int(t) == 999 and encoder_hidden_states.shape[-1] == 1024
        return (x + self.offset,)


@pytest.mark.parametrize("offset, expected", [(-1.6, "v_prediction"), (0.02, "epsilon")])
def test_sd2_auto_uses_a1111s_test_forward(offset, expected):
    det = detect_checkpoint(sd_shapes(1024, OPEN_CLIP))
    assert sd2_test_forward(_FakeUNet(offset)) == pytest.approx(offset, abs=1e-5)
    notes = []
    assert resolve_prediction_type("auto", det, unet=_FakeUNet(offset), notes=notes) == expected
    assert "prediction_type:" in notes[0]  # says how to override


def test_sd1_and_sdxl_default_to_epsilon_and_warn_on_v_names():
    det = detect_checkpoint(sd_shapes(768, CLIP_L))
    notes = []
    assert resolve_prediction_type("auto", det, path=None, notes=notes) == "epsilon"
    from pathlib import Path

    notes = []
    assert resolve_prediction_type("auto", det, path=Path("/x/model-vpred.safetensors"), notes=notes) == "epsilon"
    assert "v_prediction" in notes[0]
