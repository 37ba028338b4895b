"""The lean forward and the chunked loss compute what transformers + PEFT compute (values and LoRA gradients)."""

import pytest
import torch

from engine.text.lean import LeanDecoder, _LoraDown, _SwiGLU, lean_reason
from engine.text.loss import lm_loss, logits_loss

from text_fixtures import tiny_model


def _peft(kind, targets="all-linear", dropout=0.0, **changes):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(kind, seed=1, **changes)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    with torch.no_grad():  # a trained-looking LoRA: B away from its zero init
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return wrapped


def _packed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 24), generator=g)
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    segments = torch.stack([torch.cat([torch.ones(10), 2 * torch.ones(14)]), torch.ones(24)]).long()
    return ids, positions, segments


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_forward_matches_transformers_and_peft(kind, checkpointing):
    wrapped = _peft(kind)
    lm = wrapped.get_base_model()
    assert lean_reason(lm, 64) is None
    wrapped.train()
    ids, positions, segments = _packed_batch()
    ours = LeanDecoder(lm)(ids, positions, segments, masked=True, checkpointing=checkpointing)
    theirs = lm.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours.square().mean(), params)
    g_theirs = torch.autograd.grad(theirs.square().mean(), params)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the packed rows are two independent samples: the first one alone gives the same hidden states
    alone = LeanDecoder(lm)(ids[:1, :10], positions[:1, :10])
    torch.testing.assert_close(ours[0, :10], alone[0], atol=2e-5, rtol=1e-4)


def test_attention_only_targets_and_gqa_without_mask():
    wrapped = _peft("llama", targets=["q_proj", "v_proj"])
    lm = wrapped.get_base_model()
    ids = torch.randint(3, 300, (2, 16))
    positions = torch.arange(16).expand(2, -1)
    ours = LeanDecoder(lm)(ids, positions)
    theirs = lm.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_lean_path_refuses_what_it_does_not_compute():
    assert "not a Llama-class layout" in lean_reason(_peft("gpt2", targets=["c_attn"]).get_base_model(), 64)
    assert "sliding-window" in lean_reason(_peft("mistral", sliding_window=32).get_base_model(), 64)
    assert lean_reason(_peft("mistral", sliding_window=32).get_base_model(), 32) is None
    assert "LoRA on lm_head" in lean_reason(_peft("llama", targets=["q_proj", "lm_head"]).get_base_model(), 64)


def test_shared_dropout_down_projection_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(6, 5, generator=g) > 0.3
    out = _LoraDown.apply(h, a, mask, 0.7)
    reference = (h * mask / 0.7) @ a.t()
    torch.testing.assert_close(out, reference)
    assert torch.autograd.gradcheck(lambda h, a: _LoraDown.apply(h, a, mask, 0.7), (h, a))
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h, torch.randn(6, 5, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_chunked_loss_equals_cross_entropy_on_full_logits(monkeypatch, softcap):
    import engine.text.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 64 * 4 * 50)  # 64 rows a chunk: 300 rows take five
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 100, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (3, 100), generator=g)
    targets[:, ::7] = -100
    denominator = torch.tensor(float((targets != -100).sum() + 11))  # the step's count may span micro-batches
    ours = lm_loss(hidden, weight, targets, denominator, softcap)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    theirs = logits_loss(logits, targets, denominator)
    torch.testing.assert_close(ours, theirs)
    g_ours, = torch.autograd.grad(ours * 3, hidden)
    g_theirs, = torch.autograd.grad(theirs * 3, hidden)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(hidden, weight, targets, denominator, softcap), theirs)
