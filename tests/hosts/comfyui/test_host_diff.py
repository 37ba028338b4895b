"""host_diff: the host comparison names what changed, and excuses only ComfyUI's own re-wrap.

Pure Python on fingerprint-shaped dicts, so these run in seconds (no ComfyUI server is started).
"""
import copy

from host_diff import PARTS, changes, lora_rewrapped


def tensor(requires_grad=True, values="00"):
    return {"kind": "p", "requires_grad": requires_grad, "inference": True, "dtype": "torch.float32",
            "device": "cpu", "class": "Parameter", "values": values}


def fingerprint():
    part = {"tensors": {"attn.to_q.weight": tensor(), "norm.weight": tensor()},
            "modules": {"attn.to_q": {"training": False, "comfy_cast_weights": False}}}
    fp = {"model_patches": 0, "ids": {p: 7 for p in PARTS}, "table": {p: copy.deepcopy(part) for p in PARTS}}
    fp.update({p: {"hooks": 0, "forwards": 0, "tensors": 2, "dtypes": {"torch.float32": 2}} for p in PARTS})
    return fp


def test_an_unchanged_host_shows_no_change():
    assert changes(fingerprint(), fingerprint()) == {}


def test_every_flag_value_switch_and_count_is_named():
    after = fingerprint()
    unet = after["table"]["unet"]
    unet["tensors"]["attn.to_q.weight"].update(inference=False, dtype="torch.float16")
    unet["tensors"]["norm.weight"]["values"] = "11"
    unet["modules"]["attn.to_q"].update(training=True, comfy_cast_weights=True)
    after["clip"]["hooks"] = 2
    after["ids"]["vae"] = 8
    found = changes(fingerprint(), after)
    assert set(found) == {("unet", "tensor", "attn.to_q.weight", "inference"),
                          ("unet", "tensor", "attn.to_q.weight", "dtype"), ("unet", "tensor", "norm.weight", "values"),
                          ("unet", "module", "attn.to_q", "training"),
                          ("unet", "module", "attn.to_q", "comfy_cast_weights"), ("clip", "model", "", "hooks"),
                          ("vae", "object", "", "id")}


def test_only_requires_grad_true_to_false_counts_as_comfys_rewrap():
    after = fingerprint()
    after["table"]["unet"]["tensors"]["attn.to_q.weight"]["requires_grad"] = False  # what set_attr_param does
    after["table"]["clip"]["tensors"]["norm.weight"]["requires_grad"] = False
    after["table"]["vae"]["tensors"]["norm.weight"]["values"] = "11"
    before = fingerprint()
    before["table"]["vae"]["tensors"]["attn.to_q.weight"]["requires_grad"] = False
    after["table"]["vae"]["tensors"]["attn.to_q.weight"]["requires_grad"] = True  # never ComfyUI's re-wrap
    explained, rest = lora_rewrapped(changes(before, after))
    assert set(explained) == {("unet", "tensor", "attn.to_q.weight", "requires_grad"),
                              ("clip", "tensor", "norm.weight", "requires_grad")}
    assert set(rest) == {("vae", "tensor", "norm.weight", "values"), ("vae", "tensor", "attn.to_q.weight", "requires_grad")}
