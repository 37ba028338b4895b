"""Flux.1 (dev and schnell, and the checkpoints derived from them): a 12 B rectified-flow transformer in
Black Forest Labs' layout, 19 double-stream blocks (image and text tokens with their own weights, joint
attention) and 38 single-stream blocks over T5-XXL hidden states, CLIP-L's pooled output and, for dev,
a distilled guidance value.

Adapters hand the engine the denoiser's Linear layers under their BFL names
(`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, `img_in`), which are also ComfyUI's and
kohya's; kohya's key is the name with dots as underscores (`lora_unet_double_blocks_0_img_attn_qkv`),
so ComfyUI, Forge and kohya load our files as theirs.

Target presets follow kohya's `networks/lora_flux.py` (tests/engine/fixtures/kohya_keys/flux1*.txt):
- "kohya" (default, kohya's `train_blocks=all`): every Linear inside the blocks, 10 per double block
  (img/txt `mod.lin`, `attn.qkv`, `attn.proj`, `mlp.0`, `mlp.2`) and 3 per single block (`linear1`,
  `linear2`, `modulation.lin`): 304 modules for flux1-dev. The embedders and `final_layer` are left
  alone, as kohya leaves them unless `in_dims` is given.
- "double" / "single": kohya's `train_blocks=double` (190) and `train_blocks=single` (114).
- "attention": the double blocks' `img_attn`/`txt_attn` qkv and proj (76), what kohya trains with every
  per-type dim but the attention ones set to 0 (kohya has no attention preset of its own).
- a list of name suffixes picks exactly those Linears anywhere in the model, e.g.
  `[linear1, linear2, img_in, txt_in]` (the embedders as kohya's `in_dims` adds them).
T5-XXL never carries LoRA (kohya trains it only with `train_t5xxl`, and diffusers drops `lora_te3_`
keys); CLIP-L carries `lora_te1_` keys with `train_text_encoder`, as kohya without
`--network_train_unet_only`.
"""

from __future__ import annotations

import re

from torch import nn

from .base import FamilySpec, TextEncoderSpec
from .clip import EOS_ID, select_clip_layer
from .unet import matches_suffix

FLUX_PRESETS = ("kohya", "double", "single", "attention")
# the per-type dims of kohya's lora_flux.py, by the module names they cover
_DOUBLE = re.compile(r"^double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)$")
_SINGLE = re.compile(r"^single_blocks\.\d+\.(linear1|linear2|modulation\.lin)$")
_ATTENTION = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$")


def select_flux_layer(name: str, module: nn.Module, preset) -> bool:
    """Whether the Flux layer `name` (BFL naming) gets a LoRA under `preset`."""
    if not isinstance(module, nn.Linear):
        return False
    if isinstance(preset, (list, tuple)):
        return matches_suffix(name, preset)
    if preset == "attention":
        return bool(_ATTENTION.match(name))
    if preset == "double":
        return bool(_DOUBLE.match(name))
    if preset == "single":
        return bool(_SINGLE.match(name))
    if preset == "kohya":
        return bool(_DOUBLE.match(name) or _SINGLE.match(name))
    return False  # "locon" and other SD presets: the run refuses with the Flux presets named


def flux_key(name: str, layout) -> str:
    """kohya's key: `double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return "lora_unet_" + name.replace(".", "_")


def flux_aliases(name: str, layout) -> tuple[str, ...]:
    """Names other files use for the layer: the BFL name itself, with ComfyUI's model prefix or not."""
    return (name, "diffusion_model." + name)


# T5 (kohya's lora_te3_) is frozen: its spec is there for the conditioning's padding and messages.
T5_PAD_ID = 0
T5_TOKENS = {"dev": 512, "schnell": 256}  # kohya's t5xxl_max_token_length when not given


def t5_tokens(setting: int, variant: str) -> int:
    """T5 tokens per caption: the run's t5xxl_max_token_length, or kohya's default for the variant."""
    return int(setting) if setting else T5_TOKENS.get(variant, T5_TOKENS["dev"])

SPEC = FamilySpec(
    name="flux1", display_name="Flux.1",
    resolution=1024, max_bucket_reso=2048, oversize_factor=None,  # Flux is trained and sampled up to 2 MP
    base_model_version="flux1",
    architectures={"flux1": "flux-1-dev/lora", "dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora"},
    implementation="https://github.com/black-forest-labs/flux",
    denoiser_key=flux_key, denoiser_aliases=flux_aliases, select_denoiser=select_flux_layer, presets=FLUX_PRESETS,
    text_encoders=(
        TextEncoderSpec(kohya_prefix="lora_te1", peft_prefix="text_encoder.", model="CLIP ViT-L/14",
                        pad_id=EOS_ID, select=select_clip_layer, max_windows=1),
        TextEncoderSpec(kohya_prefix="lora_te3", peft_prefix="text_encoder_2.", model="T5-XXL",
                        pad_id=T5_PAD_ID, select=lambda name, module, preset: False, trainable=False),
    ),
    # encode_text returns T5's hidden states and CLIP-L's pooled output; the dev models' guidance value
    # is the objective's draw "cond.guidance" (engine/objectives/flow.py), image position ids are the
    # adapter's (they follow from the latent's size)
    conditioning=("context", "pooled"),
    context_dim=4096,
    objective="flow", timestep_sampling="flux_shift",  # Flux's own resolution-dependent shift
    offload_checkpointing=True,  # flux_forward.py keeps checkpointed blocks' inputs in host memory when asked
    compile_blocks=True,  # 57 blocks in one graph took minutes to compile; one graph per block kind
)
