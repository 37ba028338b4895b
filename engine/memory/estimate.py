"""The training peak of a run, predicted before its first step.

    weights  = what stays on the device: the denoiser (fp8_base: 1 byte per Linear/Conv2d weight), the
               text encoders unless their outputs are cached and they are not trained, the VAE unless
               latents are cached (the engine parks cached encoders in CPU memory, encoder_parking.py)
    lora     = LoRA parameters x (4 weight + 4 gradient + the optimizer's state) + a 2-byte copy of each
               when the step casts them once (bf16/fp16 without checkpointing)
    step     = batch x latent pixels of the largest bucket x the family's bytes per latent pixel
               (checkpointing on or off; x2 in fp32), plus a trained text encoder's own activations;
               uncached latents are encoded first, so the VAE's transient counts when it is the larger
    fp8 copy = fp8_compute: 1 byte per frozen Linear weight it multiplies in fp8 that is not stored in fp8
               already (engine/models/fp8_compute.py holds that copy for the whole run; none on fp8_base).
               Flux.1-dev on an H100: 55.54 against 44.50 GiB without checkpointing, 36.46 against 25.36
               with it, 11.04-11.10 GiB more for 11.08 GiB of Linear weights
    fixed    = cuBLAS workspace and the step's small tensors; with fp8_base, the one layer's weight cast
               to the compute dtype while it runs (forward or backward: backward keeps the fp8 weight,
               not the cast, engine/models/fp8.py), so fp8_base's peak is the bf16 peak less the
               weight bytes fp8 saves, with checkpointing on or off

The per-family numbers are in families.py; `weights_of_model` counts a loaded model's parameters on
the device (dtypes as they are), `weights_of_family` the full-size model's before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .families import FamilyMemory, family_memory

GiB = 1 << 30
OPTIMIZER_STATE = {"AdamW": 8, "AdamW8bit": 2, "Lion": 4, "Adafactor": 4, "Prodigy": 16}  # bytes per parameter
WORKSPACE = 64 << 20  # cuBLAS workspace, the step's noise/timesteps/loss, the CUDA graph's pool overhead
FP8_CAST = 32 << 20  # fp8_base: the largest layer's weight cast to bf16 (SD/SDXL's GEGLU projection 1280x10240:
# 25 MiB; Flux's linear1 is 126 MiB, inside its rows' margin). H100, 2026-12-07: the four SD fp8 rows of
# bench/memory_estimate.py within +3% to +8% with this value, +4.5% to +11.6% with 128 MiB
VAE_ENCODE = 2100  # bytes per image pixel while the VAE encodes without grad: 2.06 KB measured (H200, batch 4,
# SD1.5 at 512 and SDXL at 1024 with checkpointing on, where the encoding is the larger transient), rounded up


@dataclass(frozen=True)
class RunShape:
    """The settings the peak depends on."""

    family: str
    batch_size: int
    latent_pixels: int  # of the largest bucket (the peak is at its steps)
    precision: str  # "bf16", "fp16" or "no" (fp32)
    gradient_checkpointing: bool = False
    cache_latents: bool = True  # every latent cached: the VAE waits in CPU memory
    cache_text: bool = True  # every caption's conditioning cached
    train_text_encoder: bool = False
    optimizer: str = "AdamW"
    token_windows: int = 1
    fp8_compute: bool = False  # the frozen Linear layers multiply in fp8 (an fp8 copy of their weights)
    cpu_offload_checkpointing: bool = False  # checkpointed blocks' inputs in CPU memory (families that can)

    def but(self, **changes) -> "RunShape":
        return dataclasses.replace(self, **changes)

    @property
    def text_on_device(self) -> bool:
        return self.train_text_encoder or not self.cache_text


@dataclass(frozen=True)
class Weights:
    """Bytes of the frozen model by part, and the LoRA's parameter counts."""

    denoiser: int
    text_encoders: int
    vae: int
    fp8: int = 0  # of `denoiser`, the bytes stored in fp8 (fp8_base)
    lora_params: int = 0  # denoiser LoRA
    text_lora_params: int = 0
    fp8_copy: int = 0  # bytes of the fp8 copy fp8_compute makes: the denoiser's Linear weights not in fp8 yet


@dataclass(frozen=True)
class Estimate:
    shape: RunShape
    parts: dict[str, int]  # what the peak is made of, in bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def breakdown(self) -> str:
        names = {"weights": "model", "lora": "LoRA + optimizer", "activations": "activations",
                 "vae_encode": "VAE encoding", "fp8_copy": "fp8 copy", "fixed": "workspace"}
        return ", ".join(f"{names.get(k, k)} {gib(v)}" for k, v in self.parts.items() if v >= 0.05 * GiB) + " GiB"


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def estimate(shape: RunShape, weights: Weights) -> Estimate | None:
    """The predicted training peak, or None for a family without memory data."""
    fam = family_memory(shape.family)
    if fam is None:
        return None
    half = shape.precision in ("bf16", "fp16")
    on_device = weights.denoiser + (weights.text_encoders if shape.text_on_device else 0) + (
        0 if shape.cache_latents else weights.vae)
    params = weights.lora_params + (weights.text_lora_params if shape.train_text_encoder else 0)
    per_param = 8 + OPTIMIZER_STATE.get(shape.optimizer, 8) + (2 if half and not shape.gradient_checkpointing else 0)
    activations = _activations(fam, shape) * (1 if half else 2)
    if shape.train_text_encoder:
        activations += shape.batch_size * shape.token_windows * fam.text_activations * (1 if half else 2)
    vae = 0 if shape.cache_latents else shape.batch_size * shape.latent_pixels * fam.latent_factor ** 2 * VAE_ENCODE
    fixed = WORKSPACE + (FP8_CAST if weights.fp8 else 0)
    step = max(activations, vae)
    parts = {"weights": on_device, "lora": params * per_param,
             "activations" if step == activations else "vae_encode": step,
             "fp8_copy": weights.fp8_copy if shape.fp8_compute else 0, "fixed": fixed}
    return Estimate(shape, parts)


def _activations(fam: FamilyMemory, shape: RunShape) -> int:
    per_pixel = fam.checkpointed if shape.gradient_checkpointing else fam.activations
    if shape.gradient_checkpointing and shape.cpu_offload_checkpointing:
        per_pixel -= fam.offloaded
    return shape.batch_size * shape.latent_pixels * per_pixel


# --- where the numbers come from ---------------------------------------------------------------------
def weights_of_family(family: str, *, precision: str, fp8_base: bool = False, rank: int = 16) -> Weights | None:
    """A full-size model of the family as the engine loads it (denoiser and text encoders in the compute
    dtype, VAE in fp32), before anything is loaded."""
    fam = family_memory(family)
    if fam is None:
        return None
    width = 2 if precision in ("bf16", "fp16") else 4
    denoiser = fam.denoiser_params * (1 if fp8_base else width)
    return Weights(denoiser=denoiser, text_encoders=sum(fam.text_encoder_params) * width, vae=fam.vae_params * 4,
                   fp8=denoiser if fp8_base else 0, lora_params=rank * fam.lora_width,
                   text_lora_params=rank * fam.text_lora_width, fp8_copy=0 if fp8_base else fam.linear_params)


def _bytes(module, device_type: str | None) -> tuple[int, int]:
    """(bytes, bytes stored in 1-byte floats) of a module's tensors, those on `device_type` only if given."""
    total = fp8 = 0
    if module is None:
        return 0, 0
    for t in [*module.parameters(), *module.buffers()]:
        if device_type is not None and t.device.type != device_type:
            continue
        n = t.numel() * t.element_size()
        total += n
        fp8 += n if t.is_floating_point() and t.element_size() == 1 else 0
    return total, fp8


def weights_of_model(model, network=None, *, on_device_only: bool = True) -> Weights:
    """A loaded model's weights as they are: dtypes, fp8 storage and (`on_device_only`) only what is on
    the model's device now (encoders a host or the engine keeps in CPU memory do not count)."""
    kind = model.device.type if on_device_only else None
    roots = model.trainable_roots()
    denoiser, fp8 = _bytes(roots[0], kind)
    text = sum(_bytes(r, kind)[0] for r in roots[1:])
    vae = _bytes(model.vae_module(), kind)[0]
    lora = text_lora = 0
    if network is not None:
        lora = sum(p.numel() for p in network.unet_parameters())
        text_lora = sum(p.numel() for p in network.text_encoder_parameters())
    return Weights(denoiser=denoiser, text_encoders=text, vae=vae, fp8=fp8, lora_params=lora,
                   text_lora_params=text_lora, fp8_copy=_fp8_copy(roots[0], kind))


def _fp8_copy(module, device_type: str | None) -> int:
    """Bytes of the fp8 copy fp8_compute would make of `module`'s Linear weights: 1 per weight of a 2-D
    Linear weight with both sizes multiples of 16, not stored in a 1-byte float already (the layers
    engine/models/fp8_compute.py `adoptable` takes; a host layer with its own forward is counted too)."""
    import torch

    total = 0
    for m in module.modules() if module is not None else []:
        w = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.Linear) or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if device_type is not None and w.device.type != device_type:
            continue
        if w.is_floating_point() and w.element_size() > 1 and not w.shape[0] % 16 and not w.shape[1] % 16:
            total += w.numel()
    return total
