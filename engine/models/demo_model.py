"""The built-in demo model: a tiny SD1-structured model that has really learned something.

`tiny_sd1()` has random weights, so its pictures are noise with or without a LoRA. This one was
trained by `python -m engine.models.demo_build` (our own code, on CPU, from procedural pictures:
circles, squares and triangles in five colours on white, black or gray) and ships as
`engine/assets/demo/demo_model.safetensors`. Prompted "a red circle on a white background" it draws
one, so `python -m engine demo` can show a LoRA teaching it something it could not do before.

It has SD1's component classes (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
encoder with the real tokenizer) at toy size: 64x64 px pictures, a 4x VAE (16x16 latents), and a
32-wide two-layer text encoder. It predicts v on SD's schedule rescaled to zero terminal SNR (as
SD2-v models with ztsnr do), which the file's metadata says and the engine honours in training
and sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError
from .clip_tokenizer import EOS_ID, clip_tokenizer
from .configs import ModelConfigs, build_components
from .diffusers_adapter import DiffusersModel
from .load import te_keys_for

DEMO_MODEL_FILE = Path(__file__).resolve().parent.parent / "assets" / "demo" / "demo_model.safetensors"
DEMO_FORMAT = "inplace-lora-demo-model"  # the file's `format` metadata (engine/models/demo_build.py writes it)
IMAGE_SIZE = 64
PREFIXES = {"unet": "unet.", "vae": "vae.", "text_encoder": "text_encoder."}


def demo_configs(scaling_factor: float = 1.0) -> ModelConfigs:
    """Component configs of the demo model; `scaling_factor` is measured by the build and stored in the file."""
    unet = dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=[32, 64, 64], norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                flip_sin_to_cos=True, freq_shift=0)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
               block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
               force_upcast=False)
    clip = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return ModelConfigs("sd1", unet, vae, [("CLIPTextModel", clip)], [EOS_ID], IMAGE_SIZE)


def is_demo_model_file(path: str | Path) -> bool:
    """True for the demo model's file (or a rebuild of it): judged from the header's metadata only."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file() or p.suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == DEMO_FORMAT
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not the demo model either
        return False


def demo_model(path: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, **kwargs) -> DiffusersModel:
    """The pretrained demo model from `path` (default: the shipped file), owned and ready to train."""
    from safetensors import safe_open

    p = Path(path) if path is not None else DEMO_MODEL_FILE
    if not p.is_file():
        raise ModelError(f"the demo model {p} is missing. Restore it with `git checkout -- engine/assets/demo` "
                         f"or rebuild it (about 25 minutes on a CPU) with "
                         f"`python -m engine.models.demo_build --out \"{p}\"`.")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        scaling = float(meta["vae_scaling_factor"])
    except Exception as exc:  # noqa: BLE001 - any failure here means a damaged file
        raise ModelError(f"the demo model {p} cannot be read ({type(exc).__name__}: {exc}); restore it with "
                         f"`git checkout -- engine/assets/demo`.") from None
    prediction = meta.get("prediction_type", "epsilon")
    ztsnr = meta.get("zero_terminal_snr", "false") == "true"
    cfgs = demo_configs(scaling)
    unet, vae, (te,) = build_components(cfgs, empty=True)
    parts = {"unet": unet, "vae": vae, "text_encoder": te}
    for name, module in parts.items():
        prefix = PREFIXES[name]
        sub = {k[len(prefix):]: v.to(dtype) for k, v in sd.items() if k.startswith(prefix)}
        if name == "text_encoder":
            sub = te_keys_for(te, sub)
        result = module.load_state_dict(sub, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing:
            raise ModelError(f"the demo model {p} lacks {len(missing)} {name} weights (e.g. {missing[0]}); "
                             f"restore it with `git checkout -- engine/assets/demo`.")
    for module in parts.values():
        module.to(device).eval().requires_grad_(False)
    kwargs.setdefault("name", "demo_shapes_sd1")
    kwargs.setdefault("owns_weights", True)
    kwargs.setdefault("pad_ids", cfgs.pad_ids)
    kwargs.setdefault("zero_terminal_snr", ztsnr)
    model = DiffusersModel.from_components(unet=unet, vae=vae, text_encoders=[te], tokenizers=[clip_tokenizer()],
                                           family="sd1", prediction_type=prediction, device=device, dtype=dtype,
                                           **kwargs)
    model.notes.append(f"demo model built by {json.loads(meta.get('build', '{}')).get('builder', 'demo_build')}")
    return model
