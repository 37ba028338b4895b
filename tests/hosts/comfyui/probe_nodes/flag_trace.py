"""Test-only: record who re-wraps host weights, for `trace_flags.py` (off unless
INPLACE_LORA_TRACE_FLAGS=1 is in the server's environment).

Wraps `comfy.utils.set_attr_param` (ComfyUI's one way of putting a new Parameter on a module) and
`torch.Tensor.requires_grad_`, and counts each call whose flags differ from the tensor it replaces, by
call site: the innermost frames inside ComfyUI or this repository, as file:line.
"""
import collections
import os
import traceback

import torch

from .text_node import TextProbe

LOG = collections.OrderedDict()  # (what, site) -> {"count", "keys" (first few), "change"}


def _site():
    frames = [f for f in traceback.extract_stack()[:-2] if "flag_trace" not in f.filename]
    keep = [f"{os.path.relpath(f.filename, os.getcwd()) if f.filename.startswith(os.getcwd()) else f.filename}:{f.lineno}"
            for f in frames if "/site-packages/" not in f.filename and "/lib/python" not in f.filename]
    return " <- ".join(reversed(keep[-4:]))


def _note(what, key, old, new):
    entry = LOG.setdefault((what, _site()), {"count": 0, "keys": [], "changes": collections.Counter()})
    entry["count"] += 1
    if len(entry["keys"]) < 4:
        entry["keys"].append(key)
    entry["changes"][f"{old} -> {new}"] += 1


def _flags(t):
    return None if t is None else (t.requires_grad, t.is_inference(), str(t.dtype), str(t.device))


def install():
    import comfy.utils

    set_attr_param = comfy.utils.set_attr_param

    def traced_set_attr_param(obj, attr, value):
        prev = set_attr_param(obj, attr, value)
        now = comfy.utils.get_attr(obj, attr)
        if _flags(prev if isinstance(prev, torch.Tensor) else None) != _flags(now):
            _note("comfy.utils.set_attr_param", attr, _flags(prev if isinstance(prev, torch.Tensor) else None),
                  _flags(now))
        return prev

    comfy.utils.set_attr_param = traced_set_attr_param
    requires_grad_ = torch.Tensor.requires_grad_

    def traced_requires_grad_(self, requires_grad=True):
        old = self.requires_grad
        out = requires_grad_(self, requires_grad)
        if old != self.requires_grad:
            _note("Tensor.requires_grad_", tuple(self.shape), old, self.requires_grad)
        return out

    torch.Tensor.requires_grad_ = traced_requires_grad_


def take():
    """The log so far as a list of dicts, and a fresh one."""
    out = [{"what": what, "site": site, "count": e["count"], "keys": e["keys"], "changes": dict(e["changes"])}
           for (what, site), e in LOG.items()]
    LOG.clear()
    return out


class FlagTrace(TextProbe):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"after": ("*",)}}

    def run(self, after=None):
        return self.shown(take())
