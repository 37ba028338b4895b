"""The lean forward and the chunked loss compute what transformers + PEFT compute (values and LoRA gradients)."""

import pytest
import torch

from engine.text.lean import LeanDecoder, _SwiGLU, fuse, lean_reason, project
from engine.text.loss import lm_loss, logits_loss

from text_fixtures import one_thread, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_checkpointing_recomputes_the_same_dropout():
    """Masks drawn once per step (kept as bits while a layer waits for its recompute): a checkpointed step
    gives the plain step's output and LoRA gradients, dropout on."""
    wrapped = _peft("llama", dropout=0.25)
    wrapped.train()
    ids, positions, segments = _packed_batch()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(7)
        out = LeanDecoder(wrapped.get_base_model())(ids, positions, segments, True, checkpointing)
        results.append((out, torch.autograd.grad(out.square().mean(), params)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=1e-6)
    torch.manual_seed(8)
    assert not torch.equal(LeanDecoder(wrapped.get_base_model())(ids, positions, segments, True), a)  # dropout is on


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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_projection_gradients(dropout):
    """One GEMM for three projections, two of them with a LoRA sharing one mask: gradcheck in float64."""
    from engine.text.lean import Group, Lora

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)

    h, weight, bias = rand(6, 5), rand(9, 5, grad=False), rand(9, grad=False)
    a1, b1, a2, b2 = rand(2, 5), rand(4, 2), rand(3, 5), rand(2, 3)
    mask = torch.rand(6, 5, generator=g) > 0.3 if dropout else None

    def run(h, a1, b1, a2, b2):
        group = Group(weight, bias, [4, 3, 2], [(0, Lora(a1, b1, 2.0, dropout)), (7, Lora(a2, b2, 0.5, dropout))])
        return project(h, group, mask)

    x = h if mask is None else h * mask / (1 - dropout)  # the frozen weights see h, the LoRAs drop(h)
    expected = h @ weight.t() + bias + torch.cat([2.0 * (x @ a1.t() @ b1.t()), torch.zeros(6, 3, dtype=torch.float64),
                                                  0.5 * (x @ a2.t() @ b2.t())], dim=1)
    torch.testing.assert_close(run(h, a1, b1, a2, b2), expected)
    assert torch.autograd.gradcheck(run, (h, a1, b1, a2, b2))
    assert torch.autograd.gradcheck(lambda gu: _SwiGLU.apply(gu, 4), (rand(6, 8),))


def test_rotary_split_gradients():
    """q and k rotated, v passed on, from one [B, S, heads, D] tensor; gradients in float64."""
    from engine.text.lean import _QKV, _swap

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 4 + 2 * 2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 3, 1, 6, dtype=torch.float64, generator=g), torch.randn(2, 3, 1, 6, dtype=torch.float64,
                                                                                      generator=g)
    q, k, v = _QKV.apply(qkv, cos, sin, _swap(sin), 4, 2)
    rotate_half = lambda x: torch.cat((-x[..., 3:], x[..., :3]), dim=-1)  # noqa: E731
    plain_sin = torch.cat((-sin[..., :3], sin[..., 3:]), dim=-1)  # the sign folded into `sin` undone
    torch.testing.assert_close(q, qkv[:, :, :4] * cos + rotate_half(qkv[:, :, :4]) * plain_sin)
    torch.testing.assert_close(v, qkv[:, :, 6:])
    assert torch.autograd.gradcheck(lambda x: _QKV.apply(x, cos, sin, _swap(sin), 4, 2), (qkv,))


def test_fused_weights_are_views_the_modules_still_use():
    layers = [torch.nn.Linear(4, n, bias=i != 1) for i, n in enumerate((3, 2, 2))]
    before = [layer(torch.ones(1, 4)) for layer in layers]
    group = fuse(layers)
    assert group.weight.shape == (7, 4) and group.widths == [3, 2, 2]
    assert all(layer.weight.data_ptr() == group.weight[i].data_ptr() for layer, i in zip(layers, (0, 3, 5)))
    for layer, out in zip(layers, before):
        torch.testing.assert_close(layer(torch.ones(1, 4)), out)
    torch.testing.assert_close(project(torch.ones(1, 4), group, None), torch.cat(before, dim=1))


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


def test_chunked_loss_keeps_small_fp16_gradients_for_the_loss_scale():
    """fp16 runs scale the loss (GradScaler) so small gradients survive fp16's range: the gradient the loss
    computes in its forward must not be rounded to fp16 before that scale is applied."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (64,), generator=g)
    denominator = torch.tensor(1e6)  # a large step: every per-token gradient is tiny
    scale = 65536.0

    def grad_of(h, w):
        h = h.clone().requires_grad_(True)
        (lm_loss(h, w, targets, denominator) * scale).backward()
        return h.grad

    ours = grad_of(hidden.half(), weight.half()).double()
    reference = grad_of(hidden, weight)
    assert (ours != 0).float().mean() > 0.99
    torch.testing.assert_close(ours, reference, atol=1e-3 * reference.abs().max().item(), rtol=2e-2)
