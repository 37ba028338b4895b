"""Borrowing a host's loaded modules for training and giving them back exactly as they were.

Written for ComfyUI and true of every host built like it (Forge): two things stand between its
modules and backprop, and each is undone in `finally`:

- Weights loaded under `torch.inference_mode()` (ComfyUI's loaders) are *inference tensors*; autograd
  cannot save them for backward. `borrowed_weights` swaps each one for a normal-tensor clone, one
  tensor at a time (the old one is freed, so memory stays flat), freezes every parameter, and at the
  end swaps clones made under inference mode back in with the original `requires_grad` (ComfyUI leaves
  it True). Values are copied bit for bit both ways.
- ComfyUI's `CLIPLayer.forward` adds in place onto a tensor its LayerNorm saved for backward.
  `clip_backprop_guard` gives each `layer_norm1`/`layer_norm2` a cloned input through a pre-hook.
`unet_blocks` lists what gradient checkpointing wraps in an LDM UNet, and `state_fingerprint` what the
hash tests compare. Pure torch: no host import, so the guarantees are unit-tested without a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

_MISSING = object()


@dataclass
class _Borrowed:
    module: nn.Module
    kind: str  # "_parameters" | "_buffers"
    name: str
    requires_grad: bool
    swapped: bool


def _clone_param(t: torch.Tensor, requires_grad: bool, cls: type) -> torch.Tensor:
    data = t.detach().clone()
    if cls is nn.Parameter or not issubclass(cls, nn.Parameter):
        return nn.Parameter(data, requires_grad=requires_grad)
    return cls(data, requires_grad=requires_grad)


@contextlib.contextmanager
def borrowed_weights(roots: list[nn.Module], swap_roots: list[nn.Module]):
    """Freeze every parameter under `roots`; under `swap_roots` also replace inference tensors
    (parameters and buffers) by normal clones. Everything is put back on exit, also after an error."""
    record: list[_Borrowed] = []
    swap_ids = {id(m) for r in swap_roots for m in r.modules()}
    seen: set[int] = set()
    try:
        with torch.inference_mode(False), torch.no_grad():
            for root in roots:
                for mod in root.modules():
                    if id(mod) in seen:
                        continue
                    seen.add(id(mod))
                    swap = id(mod) in swap_ids
                    for name in list(mod._parameters):
                        p = mod._parameters[name]
                        if p is None:
                            continue
                        entry = _Borrowed(mod, "_parameters", name, p.requires_grad, False)
                        if swap and p.is_inference():
                            mod._parameters[name] = _clone_param(p, False, type(p))
                            entry.swapped = True
                        else:
                            p.requires_grad_(False)
                        record.append(entry)
                        del p
                    if not swap:
                        continue
                    for name in list(mod._buffers):
                        b = mod._buffers[name]
                        if b is not None and b.is_inference():
                            mod._buffers[name] = b.clone()
                            record.append(_Borrowed(mod, "_buffers", name, False, True))
                        del b
        yield record
    finally:
        _give_back(record)


def _give_back(record: list[_Borrowed]) -> None:
    for entry in record:
        table = getattr(entry.module, entry.kind)
        current = table.get(entry.name)
        if current is None:
            continue
        if not entry.swapped:
            # an inference tensor may only get requires_grad=True back inside inference mode
            with torch.inference_mode(current.is_inference()):
                current.requires_grad_(entry.requires_grad)
            continue
        with torch.inference_mode():
            if entry.kind == "_parameters":
                table[entry.name] = _clone_param(current, entry.requires_grad, type(current))
            else:
                table[entry.name] = current.clone()
        del current


@contextlib.contextmanager
def clip_backprop_guard(text_models: list[nn.Module]):
    """Feed each CLIP layer's LayerNorms a clone, so the layer's in-place residual add does not
    overwrite a tensor autograd saved. Pre-hooks only; removed on exit."""
    handles = []

    def clone_input(_module, args):
        return (args[0].clone(),) + tuple(args[1:])

    try:
        for root in text_models:
            for mod in root.modules():
                if all(hasattr(mod, a) for a in ("layer_norm1", "layer_norm2", "self_attn", "mlp")):
                    handles.append(mod.layer_norm1.register_forward_pre_hook(clone_input))
                    handles.append(mod.layer_norm2.register_forward_pre_hook(clone_input))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def unet_blocks(diffusion_model: nn.Module) -> list[nn.Module]:
    """The blocks inside ComfyUI's `input_blocks`, `middle_block` and `output_blocks`: what gradient
    checkpointing wraps, since ComfyUI's UNet iterates the children of its sequential blocks."""
    blocks = []
    for attr in ("input_blocks", "output_blocks"):
        for seq in getattr(diffusion_model, attr, []):
            blocks.extend(seq.children())
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        blocks.extend(middle.children())
    return blocks


def state_fingerprint(roots: list[nn.Module]) -> dict:
    """Everything `borrowed_weights` & co. promise to restore, for tests: flags, hooks, forwards."""
    flags, hooks, forwards = [], 0, 0
    for root in roots:
        for name, mod in root.named_modules():
            hooks += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
            forwards += "forward" in mod.__dict__
            for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is not None:
                    flags.append((f"{name}.{pname}", p.requires_grad, p.is_inference(), str(p.dtype),
                                  str(p.device), mod.training))
    return {"flags": flags, "hooks": hooks, "forwards": forwards}
