"""The seam carries a second objective: a tiny DiT-like flow-matching denoiser, declared as one family
spec (with BFL-style layer names and kohya keys as Flux has them) and wrapped in a test adapter, trains
through engine.train with objectives/flow.py: its loss on fixed draws falls, the file has the family's
keys and metadata, and the fast step (the CUDA graph's body) trains it exactly like the plain one, its
sigma draws carried in the step's tensor dict like DDPM's timesteps."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.families import FAMILIES, FamilySpec, TextEncoderSpec
from engine.lora.targets import build_network
from engine.model import ModelInfo, TrainableModel
from engine.objectives import FlowObjective
from engine.train import train

from train_fixtures import FAST_ON_CPU, pattern_dataset

PATCH, WIDTH, CTX = 2, 32, 16


def _kohya_key(name: str, layout) -> str:  # BFL-style names as they are: blocks.0.attn.qkv -> lora_unet_blocks_0_attn_qkv
    return "lora_unet_" + name.replace(".", "_")


TINY_FLOW = FamilySpec(
    name="tinyflow", display_name="Tiny flow", resolution=64, max_bucket_reso=1024, oversize_factor=None,
    base_model_version="tinyflow", architectures={"tinyflow": "tiny-flow/lora"},
    denoiser_key=_kohya_key, denoiser_aliases=lambda name, layout: (name,),
    select_denoiser=lambda name, module, preset: isinstance(module, nn.Linear),
    text_encoders=(TextEncoderSpec(kohya_prefix="lora_te1", peft_prefix="text_encoder.", model="hashed words",
                                   pad_id=0, select=lambda *a: False, trainable=False),),
    context_dim=CTX, objective="flow", lean_geglu=False)


class Block(nn.Module):
    """Joint attention over text and image tokens, an MLP, and adaLN-style modulation by sigma."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH, elementwise_affine=False), nn.LayerNorm(WIDTH)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(approximate="tanh"), nn.Linear(2 * WIDTH, WIDTH))
        self.modulation = nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, x, t):
        scale, shift = self.modulation(F.silu(t))[:, None].chunk(2, dim=-1)
        q, k, v = self.attn.qkv(self.norm1(x) * (1 + scale) + shift).view(*x.shape[:2], 3, 4, -1).unbind(2)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.attn.proj(h.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))


class TinyDiT(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.img_in = nn.Linear(4 * PATCH * PATCH, WIDTH)
        self.txt_in = nn.Linear(CTX, WIDTH)
        self.time_in = nn.Sequential(nn.Linear(16, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.final = nn.Linear(WIDTH, 4 * PATCH * PATCH)
        self.requires_grad_(False).eval()

    def forward(self, x, sigma, context):
        b, c, h, w = x.shape
        tokens = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * 4)
        freqs = torch.exp(-torch.arange(8, dtype=torch.float32) * 1.2) * 1000
        t = self.time_in(torch.cat([torch.sin(sigma[:, None] * freqs), torch.cos(sigma[:, None] * freqs)], -1))
        txt = self.txt_in(context)
        seq = torch.cat([txt, self.img_in(tokens)], dim=1)
        for block in self.blocks:
            seq = block(seq, t)
        out = self.final(seq[:, txt.shape[1]:])
        out = out.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


class TinyFlowModel(TrainableModel):
    """A test adapter: the tiny DiT, a fixed 8x "VAE" and hashed-word text conditioning."""

    def __init__(self):
        self.info = ModelInfo(family="tinyflow", name="tiny-flow", layout=None)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.dit = TinyDiT()

    def unet_layers(self):
        return ((n, m) for n, m in self.dit.named_modules() if isinstance(m, nn.Linear))

    def text_encoder_layers(self):
        return iter(())

    def trainable_roots(self):
        return [self.dit]

    def objective(self):
        return FlowObjective(sampling="logit_normal")

    def encode_images(self, pixels):
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def encode_text(self, captions):
        rows = [[(zlib.crc32(f"{c}|{i}".encode()) % 1000) / 500 - 1 for i in range(4 * CTX)] for c in captions]
        return {"context": torch.tensor(rows).view(len(captions), 4, CTX)}

    def predict(self, noisy, timesteps, cond):
        return self.dit(noisy, timesteps.float(), cond["context"])


@pytest.fixture
def tiny_flow_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "tinyflow", TINY_FLOW)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("flow"), n=4)


def _config(data, out, **changes):
    base = dict(train_data_dir=str(data), output_dir=str(out), output_name="flow", resolution="64", batch_size=4,
                max_train_steps=40, learning_rate=1e-2, lora_rank=8, lr_scheduler="constant", warmup_steps=0,
                save_every_n_epochs=0, save_precision="fp32", seed=3)
    base.update(changes)
    return TrainConfig(**base)


def _eval_loss(model, data, network=None) -> float:
    """The flow loss on fixed latents, captions, noise and sigmas."""
    from PIL import Image
    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / f"img{i}.png"))).permute(2, 0, 1).float()
                          / 127.5 - 1 for i in range(4)])
    x0, cond = model.encode_images(pixels), model.encode_text([f"stripes {i}" for i in range(4)])
    objective, g = model.objective(), torch.Generator().manual_seed(11)
    total = 0.0
    with torch.no_grad(), (network.applied() if network is not None else torch.no_grad()):
        for _ in range(8):
            noised = objective.noised(x0, objective.draw(x0, g))
            total += float(objective.loss(model.predict(noised.noisy, noised.timestep, cond), noised))
    return total / 8


def test_a_flow_model_trains_through_the_seam(tiny_flow_family, data, tmp_path):
    model = TinyFlowModel()
    before = _eval_loss(model, data)
    cfg = _config(data, tmp_path)
    result = train(cfg, model)
    network = build_network(model, cfg)
    network.load_kohya_state_dict(result.tensors)
    after = _eval_loss(model, data, network)
    assert after < 0.6 * before, (before, after)
    assert "lora_unet_blocks_0_attn_qkv.lora_down.weight" in result.tensors
    assert "lora_unet_blocks_1_mlp_2.lora_up.weight" in result.tensors
    assert result.metadata["ss_base_model_version"] == "tinyflow"
    assert result.metadata["modelspec.architecture"] == "tiny-flow/lora"


def test_the_fast_step_trains_a_flow_model_like_the_plain_step(tiny_flow_family, data, tmp_path):
    cfg = dict(max_train_steps=4, noise_offset=0.05)
    plain = train(_config(data, tmp_path / "plain", **cfg), TinyFlowModel())
    fast = train(_config(data, tmp_path / "fast", **cfg), TinyFlowModel(), options=FAST_ON_CPU)
    assert fast.fast_steps == 4 and plain.fast_steps == 0
    assert plain.losses == pytest.approx(fast.losses, rel=1e-5)
    for key, value in plain.tensors.items():
        assert torch.allclose(value, fast.tensors[key], rtol=1e-5, atol=1e-7), key


def test_pyramid_noise_is_refused_for_a_flow_model_and_input_perturbation_trains(tiny_flow_family, data, tmp_path):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="multires_noise_iterations is an SD setting"):
        train(_config(data, tmp_path / "a", max_train_steps=1, multires_noise_iterations=4), TinyFlowModel())
    result = train(_config(data, tmp_path / "b", max_train_steps=1, ip_noise_gamma=0.1), TinyFlowModel())
    assert result.metadata["ss_ip_noise_gamma"] == "0.1" and not result.warnings


def test_input_perturbation_moves_the_flow_input_and_keeps_the_target():
    """kohya's Flux training: noisy = (1 - s) x0 + s (noise + gamma xi), target noise - x0."""
    import dataclasses

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = FlowObjective()
    perturbed = dataclasses.replace(plain, ip_noise_gamma=0.1)
    a = plain.draw(x0, torch.Generator().manual_seed(0))
    b = perturbed.draw(x0, torch.Generator().manual_seed(0))
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["sigma"], b["sigma"])
    na, nb = plain.noised(x0, a), perturbed.noised(x0, b)
    s = b["sigma"].view(-1, 1, 1, 1)
    assert torch.equal(na.target, nb.target)
    assert torch.allclose(nb.noisy - na.noisy, s * b["ip_noise"], atol=1e-6)
    assert 0.05 < b["ip_noise"].std() < 0.15
