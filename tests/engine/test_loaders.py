"""The file loads in diffusers' own LoRA loader (what diffusers users and many tools use), changes
the output, and strength 0 gives the base model's image."""

import numpy as np
import pytest
import torch

from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    data = pattern_dataset(root / "data")
    cfg = quick_config(data, root / "out", max_train_steps=20, batch_size=4, learning_rate=5e-3,
                       train_text_encoder=True, save_precision="fp16")
    return train(cfg, tiny_sd1())


def _pipeline():
    from diffusers import StableDiffusionPipeline

    model = tiny_sd1()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=model._sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **kwargs):
    out = pipe("stripes 1", num_inference_steps=3, height=64, width=64, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images[0]


def test_diffusers_load_lora_weights_reads_every_module(trained):
    pipe = _pipeline()
    base = _image(pipe)
    pipe.load_lora_weights(str(trained.lora_path.parent), weight_name=trained.lora_path.name, adapter_name="ours")
    unet_layers = {n for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A")}
    te_layers = {n for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A")}
    ours_unet = {k for k in trained.tensors if k.startswith("lora_unet_") and k.endswith(".alpha")}
    ours_te = {k for k in trained.tensors if k.startswith("lora_te_") and k.endswith(".alpha")}
    assert len(unet_layers) == len(ours_unet) and len(te_layers) == len(ours_te)
    with_lora = _image(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    assert np.allclose(_image(pipe), base, atol=1e-6)
