"""The ComfyUI Flux adapter refuses what it cannot train through, naming the loaders that work: a Flux
loaded by ComfyUI-GGUF (GGML tensors) or as NF4 (bitsandbytes 4-bit, packed in uint8), a Fill/Kontext
model, a CLIP that is not Flux's. No ComfyUI needed: the checks read the loaded objects' types."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from inplace_lora_pack.engine.errors import ModelError
from inplace_lora_pack.nodes.comfy_flux import ComfyFluxModel, quantized_weights


class GGMLTensor(nn.Parameter):
    """What ComfyUI-GGUF's Unet Loader leaves in its Linear layers (by class name)."""


def _patcher(linear: nn.Linear, in_channels: int = 16):
    dm = nn.Module()
    dm.img_in = linear
    model_config = SimpleNamespace(unet_config={"in_channels": in_channels, "guidance_embed": True})
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=dm, model_config=model_config), load_device="cpu")


def _flux_clip():
    return SimpleNamespace(cond_stage_model=SimpleNamespace(t5xxl=object(), clip_l=None))


def test_gguf_weights_are_refused_naming_the_loaders_that_work():
    lin = nn.Linear(4, 4)
    lin.weight = GGMLTensor(torch.zeros(4, 4), requires_grad=False)
    assert quantized_weights(lin).startswith("GGUF")
    with pytest.raises(ModelError, match="GGUF.*Load Diffusion Model .*fp8_e4m3fn.*DualCLIPLoader"):
        ComfyFluxModel(_patcher(lin), _flux_clip(), object())


def test_nf4_weights_are_refused():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ModelError, match="NF4"):
        ComfyFluxModel(_patcher(lin), _flux_clip(), object())


def test_plain_and_fp8_weights_are_not_quantized():
    lin = nn.Linear(4, 4)
    assert quantized_weights(lin) is None
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    assert quantized_weights(lin) is None


def test_fill_models_and_sd_clips_are_refused():
    with pytest.raises(ModelError, match="96 input channels"):
        ComfyFluxModel(_patcher(nn.Linear(4, 4), in_channels=96), _flux_clip(), object())
    sd_clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=object()))
    with pytest.raises(ModelError, match="not Flux's text encoder.*DualCLIPLoader"):
        ComfyFluxModel(_patcher(nn.Linear(4, 4)), sd_clip, object())


class _RecordingFluxClip:
    """A ComfyUI Flux CLIP as the adapter calls it: the T5 tokenizer pads to `t5xxl_min_length` (ComfyUI's
    option, 256 by default) and never cuts; the cond has one row per T5 token."""

    def __init__(self, caption_tokens: int = 4):
        self.cond_stage_model = SimpleNamespace(t5xxl=object(), clip_l=SimpleNamespace(transformer=nn.Linear(2, 2)))
        self.caption_tokens, self.options = caption_tokens, []

    def tokenize(self, text, tokenizer_options=None):
        min_length = (tokenizer_options or {}).get("t5xxl_min_length", 256)
        self.options.append(tokenizer_options)
        return {"t5xxl": max(min_length, self.caption_tokens)}

    def encode_from_tokens(self, tokens, return_pooled=True, return_dict=True):
        return {"cond": torch.randn(1, tokens["t5xxl"], 8), "pooled_output": torch.randn(1, 6)}


def _trainable_patcher(guidance_embed=True):
    mp = _patcher(nn.Linear(4, 4))
    mp.model.model_config.unet_config["guidance_embed"] = guidance_embed
    mp.model.manual_cast_dtype = torch.float32
    return mp


@pytest.mark.parametrize("setting, caption_tokens, expected", [(0, 4, 512), (64, 4, 64), (64, 300, 64)])
def test_comfyui_t5_context_has_t5xxl_max_token_length_tokens(setting, caption_tokens, expected):
    from inplace_lora_pack.engine.config import TrainConfig

    clip = _RecordingFluxClip(caption_tokens)
    model = ComfyFluxModel(_trainable_patcher(), clip, object())
    model.set_text_options(TrainConfig(t5xxl_max_token_length=setting))
    with torch.enable_grad():  # (without grad the adapter asks ComfyUI to bring the model back)
        cond = model.encode_text(["a photo", "stripes"])
    assert cond["context"].shape == (2, expected, 8)
    assert clip.options[-1] == {"t5xxl_min_length": expected}  # padded by ComfyUI's tokenizer, not by zeros


def test_comfyui_schnell_defaults_to_256_t5_tokens():
    from inplace_lora_pack.engine.config import TrainConfig

    model = ComfyFluxModel(_trainable_patcher(guidance_embed=False), _RecordingFluxClip(), object())
    model.set_text_options(TrainConfig())
    with torch.enable_grad():
        assert model.encode_text(["a photo"])["context"].shape[1] == 256
