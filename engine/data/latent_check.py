"""Black latents: an fp16 VAE that overflows (SDXL's, without the fp16 fix) encodes an image into NaN or
infinite values, which some hosts turn into zeros. Cached, they train the LoRA on black images or NaN
losses for the whole run. Each batch encoded for the cache is checked; the samples that came out
non-finite or all zero are encoded again with the VAE in fp32 (cast back afterwards: fp16 -> fp32 ->
fp16 is exact, so a host's VAE is left bit-identical)."""

from __future__ import annotations

import logging

import torch

from ..models.module_state import temporarily_float32

logger = logging.getLogger(__name__)


def bad_samples(latents: torch.Tensor) -> torch.Tensor:
    """[B] bool: a sample with a NaN/inf value, or all zeros."""
    flat = latents.flatten(1)
    return ~torch.isfinite(flat).all(1) | (flat == 0).all(1)


def encode_checked(model, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`model.encode_images(pixels)` as float32, with bad samples encoded again in fp32 where the VAE
    is a half-precision module the adapter exposes; returns (latents, samples encoded again)."""
    latents = model.encode_images(pixels).float()
    bad = bad_samples(latents)
    if not bool(bad.any()):
        return latents, 0
    vae = model.vae_module()
    if vae is None or not any(p.dtype in (torch.float16, torch.bfloat16) for p in vae.parameters()):
        return latents, 0  # nothing to change here: the caller reports the images
    idx = bad.nonzero().flatten()
    try:
        with temporarily_float32(vae, True), torch.no_grad():
            again = model.encode_images(pixels[idx.to(pixels.device)]).float()
    except RuntimeError as exc:  # a host whose VAE call insists on its own dtype
        logger.warning("could not encode again in fp32: %s", exc)
        return latents, 0
    latents[idx.to(latents.device)] = again.to(latents.device)
    logger.warning("the VAE gave NaN or black latents for %d image(s) in %s; encoded them again in fp32",
                   len(idx), next(vae.parameters()).dtype)
    return latents, len(idx)
