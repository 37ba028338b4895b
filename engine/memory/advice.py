"""Does a run fit the device, and if not, which setting makes it fit: the text a user decides on.

    needs about 9.8 GiB at batch 4; this GPU has 7.6 GiB free: turn on gradient checkpointing
    (about 5.1 GiB) or use batch 2 with gradient_accumulation_steps 2 (about 7.0 GiB)

`free_memory(device)` is what the device can still give (CUDA: the driver's free memory plus what
PyTorch's caching allocator holds unused); `already` is what of the estimate is allocated already (a
host's loaded model), so the trainer's start and the dataset check before loading say the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import Estimate, RunShape, Weights, estimate, gib
from .families import family_memory

MARGIN = 0.95  # keep 5% of the free memory for fragmentation and the allocator's rounding


@dataclass(frozen=True)
class Advice:
    estimate: Estimate
    free: int | None  # bytes the device can give; None when unknown (CPU, MPS)
    fits: bool
    text: str
    fix: RunShape | None = None  # the first plan that fits, when the run as set up does not


def free_memory(device) -> int | None:
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def alternatives(shape: RunShape, *, can_cache: bool = True) -> list[tuple[str, RunShape]]:
    """Changes to try, cheapest in speed first: each alone, then together (the OOM recovery's order)."""
    out: list[tuple[str, RunShape]] = []
    if not shape.gradient_checkpointing:
        out.append(("turn on gradient checkpointing", shape.but(gradient_checkpointing=True)))
    fam = family_memory(shape.family)
    if shape.gradient_checkpointing and not shape.cpu_offload_checkpointing and fam is not None and fam.offloaded:
        out.append(("turn on cpu_offload_checkpointing", shape.but(cpu_offload_checkpointing=True)))
    batch, accum = shape.batch_size, 2
    while batch > 1:
        batch = max(1, batch // 2)
        out.append((f"use batch {batch} with gradient_accumulation_steps x{accum}",
                    shape.but(batch_size=batch)))
        accum *= 2
    if can_cache and not shape.cache_latents:
        out.append(("cache latents", shape.but(cache_latents=True)))
    if not shape.gradient_checkpointing:  # checkpointing together with each smaller batch
        out += [(f"turn on gradient checkpointing and {text}", s.but(gradient_checkpointing=True))
                for text, s in out[1:] if s.batch_size < shape.batch_size]
    return out


def advise(shape: RunShape, weights: Weights, free: int | None, *, already: int = 0,
           device_name: str = "this GPU", can_cache: bool = True) -> Advice | None:
    """The estimate against the free memory, with the settings that make it fit when it does not."""
    est = estimate(shape, weights)
    if est is None:
        return None
    head = f"needs about {gib(est.total)} GiB at batch {shape.batch_size}"
    if free is None:
        return Advice(est, None, True, f"{head} ({est.breakdown()})")
    need = est.total - already
    room = f"{device_name} has {gib(free)} GiB free" + (f" besides the {gib(already)} GiB loaded" if already else "")
    if need <= free * MARGIN:
        return Advice(est, free, True, f"{head}; {room}: fits ({est.breakdown()})")
    fitting = []
    for text, alt in alternatives(shape, can_cache=can_cache):
        alt_est = estimate(alt, weights)
        if alt_est.total - already <= free * MARGIN:
            fitting.append((text, alt, alt_est))
    if not fitting:
        return Advice(est, free, False, f"{head}; {room}: it will not fit even at batch 1 with gradient "
                                        f"checkpointing; lower the resolution, use fp8_base or a GPU with more memory")
    shown = " or ".join(f"{text} (about {gib(e.total)} GiB)" for text, _, e in fitting[:2])
    return Advice(est, free, False, f"{head}; {room}: {shown}", fitting[0][1])
