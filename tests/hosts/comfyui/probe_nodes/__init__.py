"""Test-only ComfyUI node: fingerprints the host's MODEL/CLIP/VAE so tests can prove a training run
left them exactly as they were (values bit for bit, and every flag the trainer touches).

It first unloads all models: ComfyUI applies LoRA patches of a loaded clone in place on the shared
modules (keeping backups), so a fair "host unchanged" hash needs no patched clone loaded.
Linked into custom_nodes/ by the test harness only; it is not part of the node pack.
"""
import collections
import hashlib
import os

import torch

from .text_node import TextProbe


def fingerprint(root):
    values, flags = hashlib.sha1(), hashlib.sha1()
    hooks = forwards = tensors = 0
    dtypes = collections.Counter(str(p.dtype) for p in root.parameters())
    for name, mod in root.named_modules():
        hooks += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
        forwards += "forward" in mod.__dict__
        flags.update(f"{name}:{mod.training};".encode())
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for key, t in table.items():
                if t is None:
                    continue
                tensors += 1
                flags.update(f"{name}.{key}:{kind}:{t.requires_grad}:{t.is_inference()}:{t.dtype}:{t.device};".encode())
                values.update(f"{name}.{key}".encode())
                data = t.detach().to("cpu").contiguous().reshape(-1)
                values.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"values": values.hexdigest(), "flags": flags.hexdigest(), "hooks": hooks, "forwards": forwards,
            "tensors": tensors, "dtypes": dict(dtypes)}


def flag_table(root):
    """What `fingerprint` hashes, per name, so a test can say which flag of which tensor changed:
    {"tensor name": {"requires_grad", "inference", "dtype", "device"}} and {"module name": training},
    plus each tensor's value digest and ComfyUI's own per-module switches (comfy_cast_weights, weight/bias functions), which the
    hashes leave out, for tracing a host's behaviour."""
    tensors, modules = {}, {}
    for name, mod in root.named_modules():
        modules[name] = {"training": mod.training, "comfy_cast_weights": getattr(mod, "comfy_cast_weights", None),
                         "weight_function": len(getattr(mod, "weight_function", ()) or ()),
                         "bias_function": len(getattr(mod, "bias_function", ()) or ())}
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for key, t in table.items():
                if t is not None:
                    data = t.detach().to("cpu").contiguous().reshape(-1)
                    sha = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
                    tensors[f"{name}.{key}"] = {"kind": kind, "requires_grad": t.requires_grad,
                                                "inference": t.is_inference(), "dtype": str(t.dtype),
                                                "device": str(t.device), "class": type(t).__name__,
                                                "values": sha.hexdigest()[:16]}
    return {"tensors": tensors, "modules": modules}


class HostFingerprint(TextProbe):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)},
                "optional": {"after": ("*",), "detail": ("BOOLEAN", {"default": False})}}

    def run(self, model, clip, vae, after=None, detail=False):
        import comfy.model_management

        comfy.model_management.unload_all_models()
        out = {"unet": fingerprint(model.model.diffusion_model), "clip": fingerprint(clip.cond_stage_model),
               "vae": fingerprint(vae.first_stage_model), "model_patches": len(model.patches)}
        if detail:
            roots = {"unet": model.model.diffusion_model, "clip": clip.cond_stage_model, "vae": vae.first_stage_model}
            out["table"] = {part: flag_table(root) for part, root in roots.items()}
            out["ids"] = {part: id(root) for part, root in roots.items()}  # the same objects, not a reload
        return self.shown(out)


from .flux_clip import TinyFluxCLIPLoader  # noqa: E402

NODE_CLASS_MAPPINGS = {"InplaceLoRATest_HostFingerprint": HostFingerprint,
                       "InplaceLoRATest_TinyFluxCLIPLoader": TinyFluxCLIPLoader}

if os.environ.get("INPLACE_LORA_TRACE_FLAGS") == "1":
    from . import flag_trace

    flag_trace.install()
    NODE_CLASS_MAPPINGS["InplaceLoRATest_FlagTrace"] = flag_trace.FlagTrace
