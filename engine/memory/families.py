"""Per-family memory data: how many bytes of activations one image keeps for backward, and the sizes of
the full-size models (for estimates made before a model is loaded).

A table keyed by the family's name (a key of `engine.families.FAMILIES`), so a new family adds one
line here. The activation numbers are bytes per latent pixel (a 1024x1024 image is 128x128 = 16384
latent pixels) per image, computing in a 2-byte dtype (bf16/fp16), with the engine's own step (lean
GEGLU, SDPA attention, LoRA added in place); fp32 doubles them. They are the slopes of the measured
peaks in bench/RESULTS.md (H100, rank 16, `ours` rows at batch 1/4/8, each line straight within 1%):
SD1.5 at 512 gained 0.803 GiB per image without checkpointing and 0.166 GiB with it, SDXL at 1024
5.569 and 0.610 GiB. bench/memory_estimate.py measures them again against the estimate.
`linear_params` counts the full-size denoiser's Linear weights (built on the meta device: SD1.5's 184
layers, SD2's 216, SDXL's 743, Flux.1-dev's 314), for fp8_compute's fp8 copy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyMemory:
    activations: int  # bytes per latent pixel per image kept for backward, checkpointing off (2-byte compute)
    checkpointed: int  # the same with gradient checkpointing on (block inputs + one block recomputed)
    denoiser_params: int  # full-size model parameter counts, for estimates before anything is loaded
    text_encoder_params: tuple[int, ...]
    vae_params: int
    lora_width: int  # sum of in + out features over the layers the default (kohya) preset adapts: x rank
    text_lora_width: int  # the same over the text encoders' adapted layers
    text_activations: int  # bytes a trained text encoder keeps for backward per caption window (2-byte)
    latent_factor: int = 8  # image pixels per latent pixel, each side
    linear_params: int = 0  # weights of the denoiser's Linear layers fp8_compute takes (both sizes multiples of 16)
    offloaded: int = 0  # of `checkpointed`, what cpu_offload_checkpointing keeps in CPU memory (0: cannot offload)


# cpu_offload_checkpointing moves the 57 blocks' token inputs to CPU memory: per image token 57 x 3072 bf16,
# a token per 2x2 latent pixels (the text tokens not counted): 1.3 GiB an image at 1024 px, where
# bench/flux_step_memory.py --offload predicts 1.2 GiB less at batch 1 and 5.3 GiB less at batch 4. One
# block's inputs come back ahead of its recomputation (engine/models/flux_offload.py's prefetch): 56 of 57 leave.
OFFLOADED_FLUX = 56 * 3072 * 2 // 4

MEMORY: dict[str, FamilyMemory] = {
    # SD2 shares SD1's UNet shapes (linear projections, 64-wide heads): SD1's activations, unmeasured
    "sd1": FamilyMemory(activations=210_500, checkpointed=43_450, denoiser_params=859_520_964,
                        text_encoder_params=(123_060_480,), vae_params=83_653_863, lora_width=423_936,
                        text_lora_width=165_888, text_activations=30 << 20, linear_params=270_049_280),
    "sd2": FamilyMemory(activations=210_500, checkpointed=43_450, denoiser_params=865_910_724,
                        text_encoder_params=(340_387_840,), vae_params=83_653_863, lora_width=432_128,
                        text_lora_width=423_936, text_activations=72 << 20, linear_params=301_219_840),
    "sdxl": FamilyMemory(activations=365_000, checkpointed=40_000, denoiser_params=2_567_463_684,
                         text_encoder_params=(123_060_480, 694_659_840), vae_params=83_653_863,
                         lora_width=2_659_840, text_lora_width=903_168, text_activations=160 << 20,
                         linear_params=2_232_647_680),
    # Flux.1-dev at 1024 px (H100, 2026-12-07, bench.run flux1 rows, the lean forward, rank 16 on kohya's
    # default 304 layers, cached latents and text): batch 1 peaks 44.50 GiB without checkpointing and
    # 25.36 with it (fp8_base 33.11 and 14.28); the checkpointed slope is the H200 run's batch 1 -> 4 (2.46
    # GiB an image). Without checkpointing only batch 1 was measured after the lean forward: its
    # activations are taken as the per-image slope (bench/flux_saved_bytes.py counts them linear in tokens)
    "flux1": FamilyMemory(activations=1_380_000, checkpointed=161_000, denoiser_params=11_901_408_320,
                          text_encoder_params=(123_060_480, 4_762_310_656), vae_params=83_819_683,
                          lora_width=4_786_176, text_lora_width=165_888, text_activations=30 << 20,
                          linear_params=11_898_322_944, offloaded=OFFLOADED_FLUX),
}


def family_memory(family: str) -> FamilyMemory | None:
    """The family's memory data, or None for a family nobody measured yet (no estimate is shown)."""
    return MEMORY.get(family)
