"""Single-file and diffusers-folder loading, offline, round-tripped through tiny models.

`to_ldm` below is a test-only diffusers -> LDM/sgm state-dict writer (the layout A1111, ComfyUI and
Civitai checkpoints use); loading its output through `load_base_model` must give the same model.
"""

import re
import socket

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelError
from engine.families.unet import diffusers_to_ldm
from engine.models.detect import detect_checkpoint
from engine.models.configs import build_components, model_configs
from engine.models.diffusers_adapter import DiffusersModel
from engine.models.load import _from_single_file, load_base_model
from engine.models.tiny import full_size_model, tiny_configs, tiny_sd1, tiny_sdxl

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(key, n_up):
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, direction, i, kind, j, rest = m.groups()
        i = int(i) if direction == "down" else n_up - 1 - int(i)
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return f"{part}.{direction}.{i}.block.{j}.{_RESNET.get(head, head)}.{tail}"
        return f"{part}.{direction}.{i}.{'downsample' if direction == 'down' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        head, _, tail = m[3].partition(".")
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET.get(head, head)}.{tail}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"
    return key.replace("conv_norm_out", "norm_out")


def clip_keys(te):
    wrap = "" if hasattr(te, "text_model") else "text_model."
    return {wrap + k: v for k, v in te.state_dict().items()}


def open_clip_keys(te, prefix):
    """HF CLIP (with projection) -> OpenCLIP names: fused qkv, resblocks, transposed projection."""
    sd, out = clip_keys(te), {}
    out[prefix + "token_embedding.weight"] = sd.pop("text_model.embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = sd.pop("text_model.embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = sd.pop("text_model.final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = sd.pop("text_model.final_layer_norm.bias")
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(src + f"self_attn.{p}_proj.{kind}")
                                                          for p in "qkv"])
            for a, b in names.items():
                out[dst + f"{b}.{kind}"] = sd.pop(src + f"{a}.{kind}")
    return out


def to_ldm(model, *, with_vae=True):
    """The model's weights as a single-file checkpoint (LDM names for SD1, sgm names for SDXL)."""
    out = {"model.diffusion_model." + diffusers_to_ldm(k, model.info.layout): v
           for k, v in model.unet.state_dict().items()}
    if with_vae:
        n_up = len(model.vae.config.block_out_channels)
        for k, v in model.vae.state_dict().items():
            ldm = "first_stage_model." + vae_to_ldm(k, n_up)
            out[ldm] = v[..., None, None] if ".mid.attn_1." in ldm and v.dim() == 2 else v
    if model.info.family == "sdxl":
        te1, te2 = model.text_encoders
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_keys(te1).items()})
        out.update(open_clip_keys(te2, "conditioner.embedders.1.model."))
    elif model.info.family == "sd2":
        out.update(open_clip_keys(model.text_encoders[0], "cond_stage_model.model."))
    else:
        out.update({"cond_stage_model.transformer." + k: v for k, v in clip_keys(model.text_encoders[0]).items()})
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and no sockets: any attempt to reach a hub fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _outputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    latents = model.encode_images(pixels)
    cond = model.encode_text(["a photo of a cat"])
    noisy = torch.randn(latents.shape, generator=gen)
    with torch.no_grad():
        return latents, cond, model.predict(noisy, torch.tensor([500]), cond)


@pytest.mark.parametrize("build, family", [(tiny_sd1, "sd1"), (tiny_sdxl, "sdxl")])
def test_single_file_round_trip_gives_identical_outputs(tmp_path, offline, build, family):
    ref = build(seed=3)
    path = tmp_path / "我的 模型" / f"tiny {family}.safetensors"
    path.parent.mkdir()
    save_file(to_ldm(ref), str(path))
    loaded = load_base_model(path, device="cpu", dtype=torch.float32, configs=tiny_configs(family))
    assert loaded.info.family == family and loaded.info.prediction_type == "epsilon"
    assert loaded.info.name == path.name and loaded.info.sha256 is None
    for a, b in zip((ref.unet, ref.vae, *ref.text_encoders), (loaded.unet, loaded.vae, *loaded.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    (lat_a, cond_a, out_a), (lat_b, cond_b, out_b) = _outputs(ref), _outputs(loaded)
    assert torch.equal(lat_a, lat_b) and torch.equal(out_a, out_b)
    assert all(torch.equal(cond_a[k], cond_b[k]) for k in cond_a)


def test_ckpt_round_trip_with_v_pred_marker_and_hash(tmp_path, offline):
    ref = tiny_sd1(seed=1)
    sd = to_ldm(ref)
    sd["v_pred"] = torch.tensor([])
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, path)
    loaded = load_base_model(path, configs=tiny_configs("sd1"), hash_file=True, dtype="bf16")
    assert loaded.info.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32
    import hashlib

    assert loaded.info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any("v_pred" in n for n in loaded.notes)


def test_diffusers_folder_loads_offline(tmp_path, offline):
    from diffusers import StableDiffusionXLPipeline

    ref = tiny_sdxl(seed=2)
    pipe = StableDiffusionXLPipeline(vae=ref.vae, text_encoder=ref.text_encoders[0],
                                     text_encoder_2=ref.text_encoders[1], tokenizer=ref.tokenizers[0],
                                     tokenizer_2=ref.tokenizers[1], unet=ref.unet,
                                     scheduler=ref._sampling_scheduler(), add_watermarker=False)
    folder = tmp_path / "tiny xl"
    pipe.save_pretrained(str(folder))
    loaded = load_base_model(folder)
    assert loaded.info.family == "sdxl" and loaded.info.prediction_type == "epsilon"
    assert loaded.pad_ids == [49407, 0]
    (_, cond_a, out_a), (_, cond_b, out_b) = _outputs(ref), _outputs(loaded)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(cond_a["pooled"], cond_b["pooled"], atol=1e-6)


def test_non_standard_sizes_need_configs(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm(tiny_sd1()), str(path))
    with pytest.raises(ModelError, match="not the standard SD1.x"):
        load_base_model(path)


def test_damaged_unet_weights_are_reported(tmp_path, offline):
    sd = to_ldm(tiny_sd1())
    sd = {k: v for k, v in sd.items() if "output_blocks.2.1." not in k}
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelError, match="UNet weights are incomplete"):
        load_base_model(path, configs=tiny_configs("sd1"))


def test_missing_path_and_xformers_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(tmp_path / "nope.safetensors")
    try:
        import xformers  # noqa: F401
    except ImportError:
        from engine.errors import ConfigError

        path = tmp_path / "tiny.safetensors"
        save_file(to_ldm(tiny_sd1()), str(path))
        with pytest.raises(ConfigError, match="attention: sdpa"):
            load_base_model(path, attention="xformers", configs=tiny_configs("sd1"))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_single_file_layout_converts_completely(family):
    """Real-size key sets (meta tensors, no memory) detect as standard and convert with no key missing."""
    cfgs = model_configs(family)
    with torch.device("meta"):
        unet, vae, tes = build_components(cfgs)
    model = DiffusersModel.from_components(unet=unet, vae=vae, text_encoders=tes, tokenizers=[None] * len(tes),
                                           family=family, device="meta")
    sd = to_ldm(model)
    det = detect_checkpoint({k: tuple(v.shape) for k, v in sd.items()}, "full.safetensors")
    assert det.family == family and det.standard
    unet2, vae2, tes2 = _from_single_file(sd, det, cfgs, "full.safetensors")  # raises on any missing key
    assert unet2.conv_in.weight.shape == unet.conv_in.weight.shape and len(tes2) == len(tes)


@pytest.mark.parametrize("family, unet_layers, te_layers", [("sd1", 282, 72), ("sd2", 282, 138), ("sdxl", 794, 265)])
def test_full_size_meta_models_detect_and_count(family, unet_layers, te_layers):
    model = full_size_model(family)
    assert sum(1 for _ in model.unet_layers()) == unet_layers
    assert sum(1 for _ in model.text_encoder_layers()) == te_layers
    # kohya's own counts: attention/ff/proj modules in transformer blocks; 6 Linear per CLIP layer
    kohya_unet = [n for n, _ in model.unet_layers() if "transformer_blocks" in n or n.endswith(("proj_in", "proj_out"))]
    assert len(kohya_unet) == {"sd1": 192, "sd2": 192, "sdxl": 722}[family]
    prefixes = {p for p, _, _ in model.text_encoder_layers()}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert all(n.startswith(("text_model.encoder.layers.", "text_projection")) for _, n, _ in model.text_encoder_layers())
