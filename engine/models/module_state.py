"""Take-and-give-back helpers for modules we borrow: placement, gradient checkpointing, attention.

A model handed to us by a caller must come back exactly as it was. Moving it to the GPU, turning
on checkpointing or switching attention kernels all change state, so each change here is recorded
first and undone in `finally`, per tensor and per attribute, also when training raised.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_MISSING = object()
_GC_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")


@contextlib.contextmanager
def placed_on(modules: list[nn.Module], device: torch.device, *, restore: bool = True):
    """Move `modules` to `device`; afterwards put every parameter and buffer back where it was
    (parameters keep their identity: only `.data` moves), unless `restore` is False."""
    record = []
    for root in modules:
        for mod in root.modules():
            for key, t in mod._parameters.items():
                if t is not None:
                    record.append((mod, "_parameters", key, t.device))
            for key, t in mod._buffers.items():
                if t is not None:
                    record.append((mod, "_buffers", key, t.device))
    try:
        for root in modules:
            root.to(device)
        yield
    finally:
        if restore:
            with torch.no_grad():
                for mod, kind, key, dev in record:
                    t = getattr(mod, kind).get(key)
                    if t is None or t.device == dev:
                        continue
                    if kind == "_parameters":
                        t.data = t.data.to(dev)
                    else:
                        mod._buffers[key] = t.to(dev)


def _checkpoint(function, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def one_block_transformer(mod: nn.Module) -> bool:
    """A transformer (diffusers' Transformer2DModel, ldm's SpatialTransformer) with a single block, as
    in every SD1.x/SD2.x UNet. Checkpointing recomputes these whole: checkpointing only the block
    leaves the group norm, proj_in, proj_out and the layout copies between them (with their LoRA)
    held for backward in every transformer, about a third of what an SD1.5 step holds at batch 1;
    recomputing them costs a norm and two 1x1 projections. Transformers with more blocks (SDXL's 2
    and 10) are checkpointed block by block, so a recompute never holds more than one block."""
    blocks = _transformer_blocks(mod)
    return blocks is not None and len(blocks) == 1 and hasattr(mod, "proj_in")


def _transformer_blocks(mod: nn.Module) -> nn.ModuleList | None:
    blocks = getattr(mod, "transformer_blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def recompute_units(modules: list[nn.Module]) -> list[nn.Module]:
    """`modules` with each transformer of several blocks replaced by its blocks (see
    `one_block_transformer`): what a host that checkpoints whole blocks should wrap."""
    out = []
    for mod in modules:
        blocks = _transformer_blocks(mod)
        if blocks is not None and len(blocks) > 1:
            out.extend(blocks)
        else:
            out.append(mod)
    return out


@contextlib.contextmanager
def gradient_checkpointing(roots: list[nn.Module]):
    """Turn on activation checkpointing in diffusers and transformers modules (both read the
    `gradient_checkpointing` flag and call `_gradient_checkpointing_func`; single-block transformers
    are wrapped whole instead, see `one_block_transformer`), then restore both attributes exactly:
    values that were set are set back, attributes that were absent are deleted."""
    saved, whole = [], []
    for root in roots:
        for mod in root.modules():
            if hasattr(mod, "gradient_checkpointing"):
                saved.append((mod, {a: mod.__dict__.get(a, _MISSING) for a in _GC_ATTRS}))
                if one_block_transformer(mod):
                    whole.append(mod)
    whole_ids = {id(mod) for mod in whole}
    try:
        for mod, _ in saved:
            mod._gradient_checkpointing_func = _checkpoint
            mod.gradient_checkpointing = id(mod) not in whole_ids
        with checkpointed_forwards(whole):
            yield len(saved)
    finally:
        for mod, attrs in saved:
            for name, value in attrs.items():
                if value is _MISSING:
                    mod.__dict__.pop(name, None)
                else:
                    setattr(mod, name, value)


@contextlib.contextmanager
def checkpointed_forwards(modules: list[nn.Module], inner: str = "forward", recompute: bool = True,
                          copy_dict_args: bool = False):
    """Recompute each module's activations in backward (non-reentrant checkpoint, only while grad is
    enabled) by giving it an instance `forward` that runs its `inner` method; the instance attribute
    is restored (or removed) afterwards. For modules whose callers do not checkpoint them (ComfyUI's
    blocks, diffusers' and ldm's whole transformers). `inner="_forward"` runs the body of ldm's
    blocks without their own reentrant checkpoint (which drops LoRA gradients); `recompute=False`
    runs it plainly, for blocks inside a module that is recomputed whole. `copy_dict_args` passes
    each dict argument as a shallow copy taken at the call, so the recompute sees what the forward
    saw: ComfyUI's UNet hands every block one `transformer_options` dict and keeps changing it
    ("block", "transformer_index"), and attention patches are looked up by those keys."""
    def wrap(mod):
        def run(*args, _f=getattr(mod, inner), **kwargs):
            if not (recompute and torch.is_grad_enabled()):
                return _f(*args, **kwargs)
            if copy_dict_args:
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return _checkpoint(_f, *args, **kwargs)

        return run

    with instance_forwards(modules, wrap) as n:
        yield n


@contextlib.contextmanager
def instance_forwards(modules: list[nn.Module], make):
    """Give each module the instance `forward` `make(module)` for the duration, then put back the
    instance attribute it had (or remove it), also after an exception: how we reroute a host's
    module without touching its class. Yields how many modules were given one."""
    saved = []
    try:
        for mod in modules:
            saved.append((mod, mod.__dict__.get("forward", _MISSING)))
            mod.forward = make(mod)
        yield len(saved)
    finally:
        for mod, previous in saved:
            if previous is _MISSING:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous


@contextlib.contextmanager
def attention_kernel(unet: nn.Module, kind: str):
    """`xformers`: use xformers' memory-efficient attention in the UNet for the duration; `sdpa`
    (default): leave the processors alone (diffusers already uses PyTorch SDPA)."""
    if kind != "xformers":
        yield
        return
    require_xformers()
    saved = dict(unet.attn_processors)
    try:
        unet.enable_xformers_memory_efficient_attention()
        yield
    finally:
        unet.set_attn_processor(saved)


def require_xformers() -> None:
    from ..errors import ConfigError

    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:
        raise ConfigError(f"attention: xformers was asked for, but xformers cannot be imported ({exc}). "
                          f"Install the xformers build that matches your torch and CUDA (pip install "
                          f"xformers), or set attention: sdpa (PyTorch's own kernel, nearly as fast).") from None


@contextlib.contextmanager
def temporarily_float32(module: nn.Module | None, when: bool):
    """Run `module` in float32 and cast it back after: fp16/bf16 -> fp32 -> fp16/bf16 is exact,
    so the caller's weights return bit-identical."""
    if module is None or not when:
        yield
        return
    dtypes = {p.dtype for p in module.parameters()}
    original = dtypes.pop() if len(dtypes) == 1 else None
    if original is None or original == torch.float32:
        yield
        return
    nn.Module.to(module, torch.float32)  # not diffusers' override, which warns on every cast
    try:
        yield
    finally:
        nn.Module.to(module, original)
