"""The disk latent cache of a host's in-memory model is keyed on its VAE's weights.

A host model has no file the cache could name (ComfyUI), or a name that stays when the user swaps the
VAE (A1111's SD VAE setting, ComfyUI's VAE Loader). Latents depend on the VAE alone: the same VAE
must find its latents again in a later session, a different one must never get them.
"""

import torch

from engine.models import tiny_sd1
from engine.models.diffusers_adapter import DiffusersModel
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


def test_disk_cache_follows_the_vae_of_an_in_memory_model(tmp_path, monkeypatch):
    folder = pattern_dataset(tmp_path / "data", n=3)
    encoded = []
    original = DiffusersModel.encode_images

    def counting(self, pixels):
        encoded.append(pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(DiffusersModel, "encode_images", counting)
    opts = dict(max_train_steps=1, cache_latents="disk")

    train(quick_config(folder, tmp_path / "first", **opts), tiny_sd1())
    assert sum(encoded) == 3
    assert len(list((folder / ".lora_cache").glob("*.safetensors"))) == 3

    encoded.clear()  # the same weights in new objects: the same checkpoint in a later session
    train(quick_config(folder, tmp_path / "again", **opts), tiny_sd1())
    assert sum(encoded) == 0

    swapped = tiny_sd1()  # the same UNet and text encoder with another VAE
    with torch.no_grad():
        swapped.vae.encoder.conv_in.weight.mul_(1.5)
    encoded.clear()
    train(quick_config(folder, tmp_path / "swapped", **opts), swapped)
    assert sum(encoded) == 3
    assert len(list((folder / ".lora_cache").glob("*.safetensors"))) == 6
