"""LoRA files: kohya layout, atomic writes, kohya's hashes, and reading other trainers' formats."""

import hashlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.lora.kohya_io import read_lora, save_lora, to_network_keys
from engine.lora.network import LoRANetwork
from engine.families.unet import SD_LAYOUT, unet_aliases
from engine.lora.targets import te_aliases


def _net():
    net = LoRANetwork()
    q = nn.Linear(320, 320)
    conv = nn.Conv2d(320, 320, 3, padding=1)
    te = nn.Linear(768, 768)
    d_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    d_conv = "down_blocks.0.resnets.0.conv1"
    net.add("lora_unet_" + d_q.replace(".", "_"), q, 4, 2.0, aliases=unet_aliases(d_q, SD_LAYOUT))
    net.add("lora_unet_" + d_conv.replace(".", "_"), conv, 4, 2.0, aliases=unet_aliases(d_conv, SD_LAYOUT))
    te_name = "text_model.encoder.layers.0.self_attn.q_proj"
    net.add("lora_te_" + te_name.replace(".", "_"), te, 4, 2.0, text_encoder=True, aliases=te_aliases("text_encoder.", te_name))
    return net


def test_save_writes_metadata_and_kohyas_hash(tmp_path):
    net = _net()
    tensors = net.kohya_state_dict()
    path = save_lora(tmp_path / "我的 lora.safetensors", tensors, {"ss_output_name": "x", "modelspec.title": "x"})
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    with safe_open(str(path), "pt") as fh:
        md = fh.metadata()
    # sshs_model_hash is the sha256 of the tensor bytes after the header (A1111 / Civitai AutoV3)
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert md["ss_output_name"] == "x" and len(md["sshs_legacy_hash"]) == 8
    assert not list(tmp_path.glob("*.tmp"))
    loaded, meta = read_lora(path)
    assert set(loaded) == set(tensors) and meta["modelspec.title"] == "x"


def test_reads_kohya_ldm_names_peft_and_comfy_native(tmp_path):
    net = _net()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 320, generator=g), torch.randn(320, 4, generator=g)
    cdown, cup = torch.randn(4, 320, 3, 3, generator=g), torch.randn(320, 4, 1, 1, generator=g)
    formats = {
        "kohya-ldm": {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
                      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0)},
        "peft": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up},
        "comfy": {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight": down,
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": up,
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(2.0),
                  "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight": cdown.reshape(4, -1),
                  "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight": cup.reshape(320, 4),
                  "diffusion_model.input_blocks.1.0.in_layers.0.diff": torch.zeros(320)},
    }
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for name, tensors in formats.items():
        renamed, ignored = to_network_keys(net, tensors)
        loaded, _ = net.load_kohya_state_dict(renamed)
        assert key in loaded, name
        assert torch.equal(net.loras[key].lora_down.weight, down)
        expected_alpha = 4.0 if name == "peft" else 2.0  # PEFT files carry no alpha: scale 1 means alpha = rank
        assert float(net.loras[key].alpha) == expected_alpha
    assert ignored == ["diffusion_model.input_blocks.1.0.in_layers.0.diff"]
    conv = net.loras["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert torch.equal(conv.lora_down.weight, cdown) and torch.equal(conv.lora_up.weight, cup)
