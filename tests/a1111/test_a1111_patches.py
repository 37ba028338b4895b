"""The two temporary patches the adapter applies: LoRA on OpenCLIP's fused attention, and gradient
checkpointing of ldm/sgm blocks. Both must compute the right thing and leave no trace."""

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
