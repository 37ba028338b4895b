"""Models that look like A1111's `shared.sd_model` to the adapter, built from the engine's tiny models.

- `ldm_tree` re-hangs a diffusers UNet's Linear/Conv2d modules under LDM names (`input_blocks.1.1...`),
  as `sd_model.model.diffusion_model` has them; the modules are shared, so hooks on one are hooks on
  the other, while the diffusers UNet does the computing.
- `FakeSD1` / `FakeSDXL` have A1111's attributes: `cond_stage_model` / `conditioner.embedders` hijack
  wrappers (`.wrapped.transformer`, `is_trainable`, SDXL size embedders with `input_key`/`outdim`),
  `first_stage_model` (encoder + quant_conv), `get_learned_conditioning`, `apply_model`,
  `parameterization`, the schedule constants, and UNet parameters left requiring grad.
- `meta_tree_from_fixture` builds a shape-only UNet from the LDM/sgm names in fixtures/.
- `openclip_tower` is an OpenCLIP text transformer (fused `nn.MultiheadAttention`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.families.unet import diffusers_to_ldm
from engine.families.unet import UNetLayout
from engine.models import tiny_sd1, tiny_sdxl
from engine.models.clip_tokenizer import tokenize

FIXTURES = Path(__file__).parent / "fixtures"


def place(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    node = root
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)


def ldm_tree(unet: nn.Module, layout: UNetLayout) -> nn.Module:
    root = nn.Module()
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            place(root, diffusers_to_ldm(name, layout), module)
    return root


def meta_tree_from_fixture(name: str) -> nn.Module:
    root = nn.Module()
    for line in (FIXTURES / f"{name}_unet.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        path, kind, cin, cout, k = line.split()
        with torch.device("meta"):
            module = nn.Linear(int(cin), int(cout)) if kind == "Linear" else nn.Conv2d(int(cin), int(cout), int(k))
        place(root, path, module)
    return root


class HijackCLIP(nn.Module):
    """Like A1111's FrozenCLIPEmbedderWithCustomWords: texts -> (B, 77*chunks, dim), here 2 chunks."""

    def __init__(self, transformer, tokenizer, pad_id: int, opts, *, pooled: bool = False):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.tokenizer, self.pad_id, self.opts, self.pooled = tokenizer, pad_id, opts, pooled
        self.is_trainable = False
        self.input_key = "txt"
        self.emphasis_seen: list[str] = []

    def forward(self, texts):
        self.emphasis_seen.append(self.opts.data.get("emphasis"))
        ids = tokenize(self.tokenizer, list(texts), self.pad_id)
        out = self.wrapped.transformer(ids)
        z = torch.cat([out.last_hidden_state, out.last_hidden_state.flip(1)], dim=1)  # a second chunk
        return (z, out.text_embeds) if self.pooled else z


class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND with outdim 1: the raw (h, w) pair, so the fake UNet can read it."""

    def __init__(self, key: str):
        super().__init__()
        self.input_key, self.outdim, self.is_trainable = key, 1, False

    def forward(self, x):
        return x.float()


class FakeA1111Model(nn.Module):
    scale_factor = 0.18215
    linear_start, linear_end, num_timesteps = 0.00085, 0.012, 1000
    is_sd1 = is_sd2 = is_sdxl = is_sd3 = is_sdxl_inpaint = False

    def __init__(self, tiny, name: str):
        super().__init__()
        layout = UNetLayout.from_diffusers_config(tiny.unet.config)
        self.model = nn.Module()
        self.model.diffusion_model = ldm_tree(tiny.unet, layout)
        self.model.unet_impl = tiny.unet
        self.first_stage_model = tiny.vae
        self.parameterization = "eps"
        self.sd_checkpoint_info = type("Info", (), {"model_name": name, "sha256": "ab" * 32})()
        self.model.requires_grad_(True)  # as A1111 leaves it
        self.predict_calls = 0
        self.lock_held_in_predict: list[bool] = []
        self.eval()

    def render(self, prompt: str, *, seed: int, width: int, height: int) -> Image.Image:
        """What the fake process_images draws: one denoiser call from seeded noise, as grey levels."""
        text = prompt.split("<lora:")[0].strip()
        g = torch.Generator().manual_seed(int(seed))
        x = torch.randn(1, 4, height // 8, width // 8, generator=g)
        with torch.no_grad():
            out = self.predict_for_render(x, text)
        arr = ((out[0, :3].permute(1, 2, 0).numpy() * 40 + 128).clip(0, 255)).astype(np.uint8)
        return Image.fromarray(arr).resize((width, height))

    def _note_predict(self):
        import sys

        self.predict_calls += 1
        lock = sys.modules["modules.call_queue"].queue_lock
        self.lock_held_in_predict.append(lock.locked())


class FakeSD1(FakeA1111Model):
    is_sd1 = True

    def __init__(self, opts, seed: int = 0):
        tiny = tiny_sd1(seed)
        super().__init__(tiny, "tiny-sd1")
        self.cond_stage_model = HijackCLIP(tiny.text_encoders[0], tiny.tokenizers[0], tiny.pad_ids[0], opts)

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)

    def apply_model(self, x, t, cond):
        self._note_predict()
        return self.model.unet_impl(x, t, encoder_hidden_states=cond).sample

    def predict_for_render(self, x, text):
        return self.apply_model(x, torch.tensor([500]), self.get_learned_conditioning([text])[:, :77])


class FakeSDXL(FakeA1111Model):
    is_sdxl = True
    scale_factor = 0.13025

    def __init__(self, opts, seed: int = 0):
        tiny = tiny_sdxl(seed)
        super().__init__(tiny, "tiny-sdxl")
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList([
            HijackCLIP(tiny.text_encoders[0], tiny.tokenizers[0], tiny.pad_ids[0], opts),
            HijackCLIP(tiny.text_encoders[1], tiny.tokenizers[1], tiny.pad_ids[1], opts, pooled=True),
            SizeEmbedder("original_size_as_tuple"), SizeEmbedder("crop_coords_top_left"),
            SizeEmbedder("target_size_as_tuple")])

    def get_learned_conditioning(self, batch):
        """sgm's GeneralConditioner: frozen embedders run without grad unless `is_trainable`."""
        n = len(batch)
        sizes = {"original_size_as_tuple": [batch.height, batch.width], "crop_coords_top_left": [0, 0],
                 "target_size_as_tuple": [batch.height, batch.width]}
        crossattn, vector = [], []
        for embedder in self.conditioner.embedders:
            grad = contextlib.nullcontext() if embedder.is_trainable else torch.no_grad()
            with grad:
                if embedder.input_key == "txt":
                    out = embedder(list(batch))
                    if isinstance(out, tuple):
                        crossattn.append(out[0])
                        vector.append(out[1])
                    else:
                        crossattn.append(out)
                else:
                    vector.append(embedder(torch.tensor([sizes[embedder.input_key]] * n)))
        return {"crossattn": torch.cat(crossattn, dim=2), "vector": torch.cat(vector, dim=1)}

    def apply_model(self, x, t, cond):
        self._note_predict()
        vector = cond["vector"]
        added = {"text_embeds": vector[:, :32], "time_ids": vector[:, 32:38]}
        return self.model.unet_impl(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=added).sample

    def predict_for_render(self, x, text):
        from fake_webui import SdConditioning

        cond = self.get_learned_conditioning(SdConditioning([text], width=x.shape[-1] * 8, height=x.shape[-2] * 8))
        return self.apply_model(x, torch.tensor([500]), cond)


class OpenCLIPBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def openclip_tower(width: int, layers: int, heads: int = 4, device=None) -> nn.Module:
    """OpenCLIP's TextTransformer layout: `transformer.resblocks.N.{attn, mlp.c_fc, mlp.c_proj}`."""
    with torch.device(device or "cpu"):
        tower = nn.Module()
        tower.transformer = nn.Module()
        tower.transformer.resblocks = nn.ModuleList([OpenCLIPBlock(width, heads) for _ in range(layers)])
        tower.text_projection = nn.Parameter(torch.zeros(width, width))
    return tower


class HijackOpenCLIP(nn.Module):
    """Like A1111's FrozenOpenCLIPEmbedderWithCustomWords around ldm's FrozenOpenCLIPEmbedder
    (penultimate layer: the last block is never run)."""

    def __init__(self, width: int, layers: int, tokenizer, opts):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.model = openclip_tower(width, layers)
        self.wrapped.model.token_embedding = nn.Embedding(49408, width)
        self.wrapped.model.positional_embedding = nn.Parameter(torch.randn(77, width) * 0.01)
        self.wrapped.model.ln_final = nn.LayerNorm(width)
        self.wrapped.layer_idx = 1
        self.tokenizer, self.opts = tokenizer, opts

    def forward(self, texts):
        model = self.wrapped.model
        ids = tokenize(self.tokenizer, list(texts), 0)
        x = (model.token_embedding(ids) + model.positional_embedding).permute(1, 0, 2)
        blocks = model.transformer.resblocks
        for block in list(blocks)[:len(blocks) - self.wrapped.layer_idx]:
            x = block(x)
        return model.ln_final(x.permute(1, 0, 2))


class FakeSD2(FakeSD1):
    is_sd1, is_sd2 = False, True

    def __init__(self, opts, seed: int = 0):
        super().__init__(opts, seed)
        tokenizer = self.cond_stage_model.tokenizer
        torch.manual_seed(seed)
        self.cond_stage_model = HijackOpenCLIP(32, 3, tokenizer, opts)
        self.cond_stage_model.eval()
