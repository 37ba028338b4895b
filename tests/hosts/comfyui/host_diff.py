"""What changed in the host model between two detailed fingerprints (probe_nodes/, `detail`), by name.

`changes` lists every per-tensor flag (requires_grad, inference tensor, dtype, device, class), every
tensor's values, every module's train flag and ComfyUI switches, and the whole-model counts (hooks,
instance forwards, tensors, dtypes, model patches), so a test can compare everything and excuse
exactly the changes a host makes by itself, and a trace can name them.
"""

PARTS = ("unet", "clip", "vae")
COUNTS = ("hooks", "forwards", "tensors", "dtypes")


def changes(before, after):
    """{(part, level, name, field): (old, new)}; level is tensor, module, model or object (the part is
    another object: ComfyUI loaded the checkpoint again, so the two fingerprints are not comparable)."""
    out = {}
    if before.get("model_patches") != after.get("model_patches"):
        out[("model", "model", "", "model_patches")] = (before.get("model_patches"), after.get("model_patches"))
    for part in PARTS:
        if before["ids"][part] != after["ids"][part]:
            out[(part, "object", "", "id")] = (before["ids"][part], after["ids"][part])
        for level, key in (("tensor", "tensors"), ("module", "modules")):
            b, a = before["table"][part][key], after["table"][part][key]
            for name in set(b) | set(a):
                if name not in b or name not in a:
                    out[(part, level, name, "present")] = (name in b, name in a)
                    continue
                for field in set(b[name]) | set(a[name]):
                    if b[name].get(field) != a[name].get(field):
                        out[(part, level, name, field)] = (b[name].get(field), a[name].get(field))
        for field in COUNTS:
            if before[part][field] != after[part][field]:
                out[(part, "model", "", field)] = (before[part][field], after[part][field])
    return out


def summary(found):
    """The changes grouped by (part, level, field, old -> new; values: just 'changed'), with a count
    and a few names: what a report or an assertion message shows."""
    groups = {}
    for (part, level, name, field), (old, new) in sorted(found.items()):
        label = f"{part} {level} {field} changed" if field == "values" else f"{part} {level} {field}: {old} -> {new}"
        groups.setdefault(label, []).append(name)
    return {k: {"count": len(v), "names": v[:3] + (["..."] if len(v) > 3 else [])} for k, v in groups.items()}


def lora_rewrapped(control):
    """The changes of ComfyUI's own LoRA graph (LoraLoader + KSampler, no trainer) that its patching
    explains: `ModelPatcher.patch_weight_to_device` puts each patched weight back on the module through
    `comfy.utils.set_attr_param`, which wraps it as `nn.Parameter(value, requires_grad=False)`, and
    `unpatch_model` restores the backup the same way (ComfyUI 0.8.0: comfy/model_patcher.py:638 and
    :851, comfy/utils.py:820), so a weight loaded with requires_grad=True comes back False. A version
    that loads its weights frozen (0.33.0: comfy/model_base.py:181 `diffusion_model.requires_grad_(False)`,
    comfy/sd1_clip.py:150) shows none. Returns (explained, the rest)."""
    explained, rest = {}, {}
    for key, change in control.items():
        part, level, _name, field = key
        target = explained if (level == "tensor" and field == "requires_grad" and change == (True, False)) else rest
        target[key] = change
    return explained, rest
