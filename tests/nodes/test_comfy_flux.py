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

    END, PAD = 1, 0  # T5's end and padding token ids

    def __init__(self, caption_tokens: int = 4):
        self.cond_stage_model = SimpleNamespace(t5xxl=object(), clip_l=SimpleNamespace(transformer=nn.Linear(2, 2)))
        self.caption_tokens, self.options, self.encoded = caption_tokens, [], []

    def tokenize(self, text, tokenizer_options=None):
        """ComfyUI's list of (token, weight, word id): the caption's words, the end token, then padding."""
        min_length = (tokenizer_options or {}).get("t5xxl_min_length", 256)
        self.options.append(tokenizer_options)
        words = [(100 + i, 1.0, i + 1) for i in range(self.caption_tokens - 1)] + [(self.END, 1.0, 0)]
        return {"t5xxl": [words + [(self.PAD, 1.0, 0)] * max(0, min_length - len(words))]}

    def encode_from_tokens(self, tokens, return_pooled=True, return_dict=True):
        self.encoded.append([t[0] for t in tokens["t5xxl"][0]])
        return {"cond": torch.randn(1, len(tokens["t5xxl"][0]), 8), "pooled_output": torch.randn(1, 6)}


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


def test_comfyui_long_caption_is_cut_before_encoding_and_keeps_its_end_token():
    """kohya (and our command line) truncate at the tokenizer: the model sees the caption's first tokens
    and then T5's end token, not a context cut off mid-caption."""
    from inplace_lora_pack.engine.config import TrainConfig

    clip = _RecordingFluxClip(caption_tokens=300)
    model = ComfyFluxModel(_trainable_patcher(), clip, object())
    model.set_text_options(TrainConfig(t5xxl_max_token_length=64))
    with torch.enable_grad():
        model.encode_text(["a very long caption"])
    ids = clip.encoded[-1]
    assert len(ids) == 64 and ids[-1] == clip.END and ids[:63] == list(range(100, 163))


def test_comfyui_schnell_defaults_to_256_t5_tokens():
    from inplace_lora_pack.engine.config import TrainConfig

    model = ComfyFluxModel(_trainable_patcher(guidance_embed=False), _RecordingFluxClip(), object())
    model.set_text_options(TrainConfig())
    with torch.enable_grad():
        assert model.encode_text(["a photo"])["context"].shape[1] == 256


@pytest.fixture
def fake_comfy_sampler(monkeypatch):
    """comfy.sample as the adapter calls it, recording the CFG and the conditionings it is given."""
    import sys

    calls = []

    def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw):
        calls.append({"cfg": cfg, "positive": positive[0][1], "negative": negative[0][1]})
        return latent

    comfy = SimpleNamespace(sample=SimpleNamespace(prepare_noise=lambda latent, seed: torch.zeros_like(latent),
                                                   sample=sample),
                            model_management=SimpleNamespace(load_models_gpu=lambda *a, **k: None))
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.sample", comfy.sample)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    return calls


@pytest.mark.parametrize("line, setting, guidance, cfg", [("a cat", 3.5, 3.5, 1.0), ("a cat", 2.0, 2.0, 1.0),
                                                         ("a cat --g 5 --l 2", 2.0, 5.0, 2.0)])
def test_comfyui_flux_previews_use_sample_guidance(fake_comfy_sampler, line, setting, guidance, cfg):
    """The run's sample_guidance (or a prompt's --g, kohya's option) reaches ComfyUI's sampler as the
    conditioning's guidance, as FluxGuidance puts it; CFG is 1 unless the prompt's --l says otherwise (the SD
    setting sample_cfg 7 does not apply)."""
    from inplace_lora_pack.engine.config import TrainConfig
    from inplace_lora_pack.engine.sample import load_prompts, render_previews

    vae = SimpleNamespace(decode=lambda samples: torch.zeros(1, 16, 16, 3))
    model = ComfyFluxModel(_trainable_patcher(), _RecordingFluxClip(), vae)
    run = TrainConfig(sample_prompts=[line], sample_guidance=setting, sample_cfg=7.0)
    images = render_previews(model, load_prompts(run), run, (128, 128))
    assert len(images) == 1 and len(fake_comfy_sampler) == 1
    call = fake_comfy_sampler[0]
    assert (call["positive"]["guidance"], call["negative"]["guidance"], call["cfg"]) == (guidance, guidance, cfg)


def test_comfyui_schnell_previews_have_no_guidance(fake_comfy_sampler):
    from inplace_lora_pack.engine.config import TrainConfig
    from inplace_lora_pack.engine.sample import load_prompts, render_previews

    vae = SimpleNamespace(decode=lambda samples: torch.zeros(1, 16, 16, 3))
    model = ComfyFluxModel(_trainable_patcher(guidance_embed=False), _RecordingFluxClip(), vae)
    run = TrainConfig(sample_prompts=["a cat"])
    render_previews(model, load_prompts(run), run, (128, 128))
    assert "guidance" not in fake_comfy_sampler[0]["positive"]
