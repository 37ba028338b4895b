"""The two temporary patches the adapter applies: LoRA on OpenCLIP's fused attention, and gradient
checkpointing of ldm/sgm blocks. Both must compute the right thing and leave no trace."""

import contextlib

import pytest
import torch
from torch import nn

from engine.lora.network import LoRANetwork
from fake_models import OpenCLIPBlock
from inplace_lora_a1111.checkpointing import block_checkpointing
from inplace_lora_a1111.fused_attention import SLOTS, FusedAttentionLoRA


def test_fused_attention_lora_equals_editing_the_weights():
    torch.manual_seed(0)
    block = OpenCLIPBlock(16, 4).eval()
    fused = FusedAttentionLoRA()
    net = LoRANetwork()
    for slot, proxy in zip(SLOTS, fused.proxies_for(block.attn)):
        net.add(f"lora_te_text_model_encoder_layers_0_self_attn_{slot}", proxy, rank=2, alpha=2)
    keys, x = list(block.state_dict()), torch.randn(5, 3, 16)
    plain = block(x)
    with fused.installed():
        net.attach()
        assert torch.equal(block(x), plain)  # up weights start at zero
        for lora in net.loras.values():
            nn.init.normal_(lora.lora_up.weight)
        deltas = [(lora.lora_up.weight @ lora.lora_down.weight).detach() for lora in net.loras.values()]
        out = block(x)
        out.sum().backward()
        net.detach()
    assert all(lora.lora_up.weight.grad.abs().sum() > 0 for lora in net.loras.values())
    edited = OpenCLIPBlock(16, 4).eval()
    edited.load_state_dict(block.state_dict())
    with torch.no_grad():
        edited.attn.in_proj_weight += torch.cat(deltas[:3])
        edited.attn.out_proj.weight += deltas[3]
    assert torch.allclose(out, edited(x), atol=1e-5)
    assert torch.equal(block(x), plain) and list(block.state_dict()) == keys
    assert "forward" not in block.attn.__dict__ and type(block.attn.in_proj_weight) is nn.Parameter


def test_fused_wrapper_refuses_to_stack_on_another_wrapper():
    block = OpenCLIPBlock(8, 2)
    fused = FusedAttentionLoRA()
    fused.proxies_for(block.attn)
    block.attn.forward = lambda *a, **k: None
    try:
        with fused.installed():
            raise AssertionError("should refuse")
    except RuntimeError as exc:
        assert "another extension" in str(exc)
    assert "forward" in block.attn.__dict__  # the other wrapper is left in place


class BasicTransformerBlock(nn.Module):
    """Shaped like ldm's: `forward` goes through a checkpoint helper, `_forward` does the work."""

    def __init__(self, dim):
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        return self._forward(x, context)

    def _forward(self, x, context=None):
        x = x + torch.tanh(self.attn(x))
        return x + self.ff(x if context is None else x + context)


class ResBlock(BasicTransformerBlock):
    def forward(self, x, emb):
        return self._forward(x, emb)


def _lora_grads(root, use_checkpointing):
    net = LoRANetwork()
    torch.manual_seed(1)
    for i, (name, m) in enumerate((n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)):
        net.add(f"m{i}", m, rank=2, alpha=2)
        nn.init.normal_(net.loras[f"m{i}"].lora_up.weight)
    x, ctx = torch.randn(2, 8), torch.randn(2, 8)  # the block inputs do not require grad (UNet-only)
    with block_checkpointing(root) if use_checkpointing else torch.enable_grad() as patched:
        net.attach()
        out = root[1](root[0](x, context=ctx), ctx)
        out.sum().backward()
        net.detach()
    return [p.grad.clone() for p in net.parameters()], patched


def test_checkpointing_keeps_lora_gradients_and_restores_the_class_forward():
    torch.manual_seed(0)
    root = nn.Sequential(BasicTransformerBlock(8), ResBlock(8)).requires_grad_(False)
    plain, _ = _lora_grads(root, False)
    checked, patched = _lora_grads(root, True)
    assert patched == 2
    assert all(g.abs().sum() > 0 for g in checked)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checked))
    assert all("forward" not in m.__dict__ for m in root.modules())
    assert BasicTransformerBlock.forward.__qualname__ == "BasicTransformerBlock.forward"


class SpatialTransformer(nn.Module):
    """Shaped like ldm's: group norm, 1x1 proj_in, the blocks over (b, h*w, c) tokens, 1x1 proj_out,
    plus the input."""

    def __init__(self, dim, depth):
        super().__init__()
        self.norm = nn.GroupNorm(2, dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context=context)
        return self.proj_out(x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()) + x_in


@pytest.mark.parametrize("depth", [1, 2])
def test_a_single_block_transformer_is_recomputed_whole(depth):
    """SD1/SD2's one-block SpatialTransformers hold nothing for backward but their inputs (norm and
    projection outputs are recomputed too); SDXL's deeper ones are checkpointed block by block. LoRA
    gradients stay those of the plain run, and no instance forward is left behind."""
    torch.manual_seed(0)
    st = SpatialTransformer(8, depth).requires_grad_(False)
    net = LoRANetwork()
    for i, m in enumerate(m for m in st.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
        net.add(f"m{i}", m, rank=2, alpha=2)
        nn.init.normal_(net.loras[f"m{i}"].lora_up.weight)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 1, 8)

    def run(use_checkpointing):
        held = []

        def pack(t):
            if t.data_ptr() not in (x.data_ptr(), ctx.data_ptr()):
                held.append(t.numel())
            return t

        net.zero_grad(set_to_none=True)
        with block_checkpointing(st) if use_checkpointing else contextlib.nullcontext(0) as patched:
            net.attach()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = st(x, context=ctx)
            out.square().sum().backward()
            net.detach()
        return [p.grad.clone() for p in net.parameters()], patched, sum(held)

    plain, _, held_plain = run(False)
    checked, patched, held = run(True)
    assert held_plain > 0 and all(g.abs().sum() > 0 for g in checked)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, checked))
    if depth == 1:
        assert patched == 1 and held == 0  # the transformer, recomputed whole
    else:
        assert patched == 2 and held > 0  # its two blocks; norm and projections stay held
    assert all("forward" not in m.__dict__ for m in st.modules())
