"""What a Flux.1 training forward keeps for backward, per token and per block kind: ours against diffusers'.

    python -m bench.flux_saved_bytes [--width 3072] [--tokens 64,256]

A CPU tool (no GPU, no timing): it builds one double and one single block of each implementation at
the given width (head dim 128, random bf16 weights, rank-16 LoRA), runs a forward at two image sizes
with `torch.autograd.graph.saved_tensors_hooks` recording every tensor autograd keeps, and prints the
bytes per token of each block kind (the difference between the two sizes, so per-sample tensors such as
the modulation vectors drop out), grouped by the line of code that saved them. Storages are counted
once (a tensor saved by three ops is held once) and the frozen weights not at all.

- ours: engine/models/flux_forward.py on the engine's FluxTransformer with the network `build_network`
  makes for kohya's default targets (every Linear of both block kinds), attached and cast as a step does
  (native bf16, LoRA weights cast once to bf16).
- diffusers: FluxTransformer2DModel with PEFT, LoRA weights fp32 as `cast_training_params` leaves them,
  under bf16 autocast as accelerate runs it (on the CPU: CUDA's autocast keeps layer_norm in fp32, so on
  the GPU diffusers saves somewhat more than printed here), on the 342 default targets of
  `train_dreambooth_lora_flux.py` ("diffusers") and on every Linear of both block kinds ("diffusers-all").

Full size: 57 blocks (19 double, 38 single) at 4608 tokens (4096 image + 512 text) per image; the tool
prints that prediction too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch

RANK = 16
HERE = __file__.rsplit("/", 1)[-1]


def _origin() -> str:
    """The innermost frame of engine/diffusers/peft code (not torch's or flux_lean's hooks) that made
    autograd save."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if (("/engine/" in name or "/diffusers/" in name or "/peft/" in name) and not name.endswith(HERE)
                and not name.endswith("flux_lean.py")):
            return f"{name.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "(other)"


class SavedBytes:
    """Records each storage autograd saves, once, under the current `label` and the saving line;
    storages of `exclude` (the frozen weights) are skipped."""

    def __init__(self, exclude=()):
        self.label = "outer"
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes: collections.Counter = collections.Counter()  # (label, origin, dtype) -> bytes

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.seen and storage.nbytes():
                self.seen.add(ptr)
                self.bytes[(self.label, _origin(), str(t.dtype).replace("torch.", ""))] += storage.nbytes()
        return t

    @contextlib.contextmanager
    def recording(self):
        """Count what autograd keeps; inside flux_lean.lean_saves (whose hooks replace these) count what
        it keeps: the tensor, or for a recipe the tensors its closure holds."""
        try:
            from engine.models import flux_lean
        except ImportError:  # a checkout from before the lean forward: nothing else to count
            flux_lean = None
        if flux_lean is None:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
            return
        original = flux_lean._Recipes.pack

        def pack(recipes, t):
            kept = original(recipes, t)
            if isinstance(kept, flux_lean._Saved):
                for t in kept.recipe.tensors():
                    self._pack(t)
            else:
                self._pack(kept)
            return kept

        flux_lean._Recipes.pack = pack
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            flux_lean._Recipes.pack = original

    def by_label(self) -> dict[str, int]:
        out: collections.Counter = collections.Counter()
        for (label, _, _), n in self.bytes.items():
            out[label] += n
        return dict(out)


@contextlib.contextmanager
def labelled(counter: SavedBytes, label: str):
    previous, counter.label = counter.label, label
    try:
        yield
    finally:
        counter.label = previous


# --- ours -----------------------------------------------------------------------------------------------

def flux_dims(width: int):
    from dataclasses import replace

    from engine.models.flux_tiny import FLUX1_DEV

    return replace(FLUX1_DEV, hidden=width, depth=1, depth_single=1, vec_in=32, context_in=64)


def _fill(module, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return module.requires_grad_(False)


def ours(width: int, targets="kohya"):
    """(model, network, run(latents, sigma, context, pooled, guidance, counter) -> velocity)."""
    from torch import nn

    from engine.config import TrainConfig
    from engine.lora.targets import build_network
    from engine.models import flux_forward as ff
    from engine.models.flux_adapter import FluxModel
    from engine.models.flux_model import FluxTransformer

    transformer = _fill(FluxTransformer(flux_dims(width), dtype=torch.bfloat16))
    model = FluxModel(transformer, None, nn.Module(), nn.Module(), None, None, dtype=torch.bfloat16)
    network = build_network(model, TrainConfig(lora_rank=RANK, lora_alpha=RANK, target_modules=targets))
    with torch.no_grad():  # a trained LoRA: up weights not zero
        for lora in network.loras.values():
            lora.lora_up.weight.normal_(0.0, 0.02)

    def run(x, sigma, context, pooled, guidance, counter: SavedBytes | None = None):
        double, single = ff.double_block, ff.single_block

        def wrap(fn, label):
            def inner(*a, **k):
                with labelled(counter, label) if counter is not None else contextlib.nullcontext():
                    return fn(*a, **k)
            return inner

        ff.double_block, ff.single_block = wrap(double, "double"), wrap(single, "single")
        try:
            with network.applied(), network.cast_weights(torch.bfloat16):
                return ff.flux_forward(transformer, x.to(torch.bfloat16), sigma, context, pooled, guidance)
        finally:
            ff.double_block, ff.single_block = double, single

    return transformer, network, run


# --- diffusers --------------------------------------------------------------------------------------------

DEFAULT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                   "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2"]  # train_dreambooth_lora_flux.py's default (bench/peer_diffusers_flux.py)
ALL_TARGETS = DEFAULT_TARGETS + ["norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]


def diffusers(width: int, targets=DEFAULT_TARGETS):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    d = flux_dims(width)
    model = _fill(FluxTransformer2DModel(
        patch_size=1, in_channels=d.in_channels, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=d.heads, joint_attention_dim=d.context_in, pooled_projection_dim=d.vec_in,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))).to(torch.bfloat16)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()

    def run(x, sigma, context, pooled, guidance, counter: SavedBytes | None = None):
        from diffusers import FluxPipeline

        from engine.models.flux_forward import pack

        b, c, h, w = x.shape
        handles = []
        if counter is not None:
            for label, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
                for blk in blocks:
                    handles.append(blk.register_forward_pre_hook(lambda m, a, label=label: setattr(counter, "label", label)))
                    handles.append(blk.register_forward_hook(lambda m, a, o: setattr(counter, "label", "outer")))
        try:
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(hidden_states=pack(x.to(torch.bfloat16)), timestep=sigma, guidance=guidance,
                             pooled_projections=pooled.to(torch.bfloat16), encoder_hidden_states=context.to(torch.bfloat16),
                             txt_ids=torch.zeros(context.shape[1], 3), img_ids=ids, return_dict=False)[0]
        finally:
            for hd in handles:
                hd.remove()

    return model, run


# --- measuring ------------------------------------------------------------------------------------------------

def inputs(side: int, text: int, width: int, seed: int = 1):
    d = flux_dims(width)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, side, side, generator=g), torch.rand(1, generator=g), torch.randn(1, text, d.context_in,
            generator=g).to(torch.bfloat16), torch.randn(1, d.vec_in, generator=g).to(torch.bfloat16), torch.ones(1))


def saved_per_token(module, run, width: int, sides=(8, 16), text: int = 16):
    """{label: bytes per token}, {(label, origin, dtype): bytes per token} from forwards at two sizes."""
    counts = []
    for side in sides:
        counter = SavedBytes(exclude=[p for p in module.parameters() if not p.requires_grad])
        with counter.recording():
            run(*inputs(side, text, width), counter=counter)
        counts.append(counter)
    tokens = [(s // 2) ** 2 + text for s in sides]
    dt = tokens[1] - tokens[0]
    per_label = {k: (counts[1].by_label().get(k, 0) - counts[0].by_label().get(k, 0)) / dt
                 for k in set(counts[1].by_label()) | set(counts[0].by_label())}
    keys = set(counts[0].bytes) | set(counts[1].bytes)
    detail = {k: (counts[1].bytes.get(k, 0) - counts[0].bytes.get(k, 0)) / dt for k in keys}
    return per_label, {k: v for k, v in detail.items() if v}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--sides", default="8,16", help="two latent sides (image tokens = (side/2)^2)")
    p.add_argument("--tools", default="ours,diffusers,diffusers-all")
    args = p.parse_args(argv)
    sides = tuple(int(s) for s in args.sides.split(","))
    torch.manual_seed(0)
    for tool in args.tools.split(","):
        if tool == "ours":
            module, _, run = ours(args.width)
        else:
            module, run = diffusers(args.width, DEFAULT_TARGETS if tool == "diffusers" else ALL_TARGETS)
        per_label, detail = saved_per_token(module, run, args.width, sides)
        full = (19 * per_label.get("double", 0) + 38 * per_label.get("single", 0) + per_label.get("outer", 0)) * 4608
        print(f"\n== {tool} (width {args.width}): bytes saved per token, /width in brackets")
        for label in ("double", "single", "outer"):
            v = per_label.get(label, 0)
            print(f"  {label:7s} {v:12.0f}  ({v / args.width:6.2f}/width)")
        print(f"  full size, batch 1 (19 double + 38 single at 4608 tokens): {full / 2**30:.1f} GiB")
        for (label, origin, dtype), v in sorted(detail.items(), key=lambda kv: (kv[0][0], -kv[1])):
            print(f"    {label:7s} {v / args.width:6.2f}/width {dtype:9s} {origin}")
        del module, run


if __name__ == "__main__":
    main()
