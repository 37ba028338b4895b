"""engine/models/flux_tiny.py writes the Flux.1 layout kohya trains: every Linear kohya's
`networks.lora_flux` adapts in flux1-dev (fixtures/kohya_keys/flux1*.txt) exists in our layout with
the shapes kohya's LoRA implies, and the file round-trips through safetensors with those keys."""

import torch
from safetensors import safe_open

from engine.models.flux_tiny import (FLUX1_DEV, FLUX1_SCHNELL, MICRO, flux_linear_shapes, flux_tensor_shapes,
                                     flux_vae_shapes, write_flux)
from test_kohya_parity import _kohya_fixture as _kohya


def test_kohya_flux_modules_are_linears_of_our_layout_with_their_shapes():
    ours = {"lora_unet_" + name.replace(".", "_"): shape for name, shape in flux_linear_shapes(FLUX1_DEV).items()}
    for case in ("flux1", "flux1_in_dims", "flux1_single", "flux1_double", "flux1_attn"):
        for name, (down, up) in _kohya(case).items():
            out_features, in_features = ours[name]
            assert (down[1], up[0]) == (in_features, out_features), (case, name)
    # kohya's default: every Linear of both block kinds, nothing outside them
    assert {k for k in ours if "_blocks_" in k} == set(_kohya("flux1"))


def test_flux1_dev_layout_counts():
    shapes = flux_tensor_shapes(FLUX1_DEV)
    assert len(shapes) == 780 and abs(sum(torch.Size(s).numel() for s in shapes.values()) / 1e9 - 11.90) < 0.01
    assert not any(k.startswith("guidance_in") for k in flux_tensor_shapes(FLUX1_SCHNELL))
    assert len(flux_vae_shapes()) == 244 and flux_vae_shapes()["decoder.conv_in.weight"] == (512, 16, 3, 3)


def test_written_file_has_the_layout(tmp_path):
    path = write_flux(tmp_path / "flux.safetensors", MICRO)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("single_blocks.0.linear1.weight").get_shape() == [3 * 256 + 4 * 256, 256]
        assert f.get_tensor("double_blocks.0.img_attn.norm.query_norm.scale").eq(1).all()
    assert keys == set(flux_tensor_shapes(MICRO))
