"""fp8_compute: the frozen base's Linear layers multiply in fp8 (forward and input gradient), within
fp8's tolerance of bf16, with the LoRA learning on top, and the host's model given back bit-identical.

torch's CPU `_scaled_mm` takes float8 with row-wise scales, so these tests run the real code path
(`ALLOW_CPU`); the Triton quantisation kernel and the speed are checked on the GPU by
`python -m bench.fp8_check` and `python -m bench.fp8_gemms`.

Tolerances: e4m3 rounds each operand to 3 mantissa bits (relative error up to 1/16, about 1.8%
RMS), so a product of two quantised operands is within about 3% RMS of the bf16 product; the tests
allow 6% (relative Frobenius error). Against an exact float32 product of the same quantised operands
the only difference is the bf16 output rounding and summation order: 1%.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.models.fp8_compute as fc
from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.lora.targets import build_network
from engine.models import tiny_sd1
from engine.models.fp8 import store_in_fp8
from engine.models.fp8_quant import E4M3, dequantize_rows, quantize_rows_torch

FP8_RTOL = 0.06
EXACT_RTOL = 0.01


@pytest.fixture(autouse=True)
def cpu_allowed(monkeypatch):
    monkeypatch.setattr(fc, "ALLOW_CPU", True)
    monkeypatch.setattr(fc, "MIN_ROWS", 16)


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def frozen_linear(k, n, dtype=torch.bfloat16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype).requires_grad_(False)
    with torch.no_grad():  # output rows of very different sizes, as trained weights have
        lin.weight.mul_(torch.logspace(-3, 1, n, dtype=torch.float32).to(dtype)[:, None])
    return lin


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def same_bits(module: nn.Module, before: dict) -> bool:
    now = module.state_dict(keep_vars=True)
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and torch.equal(raw(now[k]), raw(v))
        for k, v in before.items())


def run(lin, x, fp8: bool, **kw):
    x = x.detach().clone().requires_grad_(True)
    with fc.fp8_compute(lin, fp8, "cpu", "bf16", **kw):
        out = lin(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad


def test_forward_and_input_gradient_are_within_fp8_tolerance_of_bf16():
    lin = frozen_linear(64, 96)
    x = torch.randn(2, 150, 64, dtype=torch.bfloat16) * torch.logspace(-2, 2, 150)[None, :, None].bfloat16()
    ref_out, ref_dx = run(lin, x, fp8=False)
    out, dx = run(lin, x, fp8=True)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert rel(out, ref_out) < FP8_RTOL and rel(dx, ref_dx) < FP8_RTOL
    assert rel(out, ref_out) > 1e-4  # it really ran in fp8

    # every row keeps its precision however small it is (row-wise scales): the smallest output rows
    # (weights 1000x smaller) and the smallest tokens (100x) are as close as the largest
    assert rel(out[..., :8], ref_out[..., :8]) < FP8_RTOL
    assert rel(out[:, :10], ref_out[:, :10]) < FP8_RTOL and rel(dx[:, :10], ref_dx[:, :10]) < FP8_RTOL


def test_products_are_exactly_those_of_the_quantised_operands():
    """The scales are applied where they belong: forward = Q(x) @ Q(W).t() + b, input gradient =
    Q(dy * s_w) @ W_q, computed here in float32 from the quantised operands."""
    lin = frozen_linear(48, 80)
    x = torch.randn(64, 48, dtype=torch.bfloat16)
    w = fc.fp8_weight(lin)
    assert w.q.dtype == E4M3 and w.copied
    xq, xs = quantize_rows_torch(x)
    expected = dequantize_rows(xq, xs) @ dequantize_rows(w.q, w.scale.t()).t() + lin.bias.float()
    x.requires_grad_(True)
    out = fc.linear_fp8(x, w)
    assert rel(out, expected) < EXACT_RTOL
    dy = torch.randn_like(out)
    out.backward(dy)
    gq, gs = quantize_rows_torch(dy, w.fold)
    assert rel(x.grad, dequantize_rows(gq, gs) @ w.q.float()) < EXACT_RTOL


def test_host_model_is_bit_identical_after_the_run_and_after_an_exception():
    model = tiny_sd1()
    unet = model.unet.to(torch.bfloat16).requires_grad_(False)
    before = snapshot(unet)
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    with fc.fp8_compute(unet, True, "cpu", "bf16") as n:
        assert n > 10
        assert sum("forward" in m.__dict__ for m in unet.modules()) == n
        unet(x, t, ctx).sample.float().pow(2).mean()
    assert same_bits(unet, before)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with fc.fp8_compute(unet, True, "cpu", "bf16"):
            unet(x, t, ctx)
            raise RuntimeError("boom")
    assert same_bits(unet, before)
    assert not any("forward" in m.__dict__ for m in unet.modules())


def _lora_grads(model, fp8: bool):
    torch.manual_seed(1)
    net = build_network(model, TrainConfig(train_data_dir=".", output_dir=".", lora_rank=4, lora_alpha=4))
    for lora in net.loras.values():
        nn.init.normal_(lora.lora_up.weight, std=0.05)
    net.attach()
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    ctx = torch.randn(2, 77, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    try:
        with fc.fp8_compute(model.unet, fp8, "cpu", "bf16"), net.cast_weights(torch.bfloat16):
            loss = model.unet(x, torch.tensor([10, 500]), ctx).sample.float().pow(2).mean()
            loss.backward()
    finally:
        net.detach()
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def test_lora_gradients_flow_through_the_fp8_layers():
    model = tiny_sd1()
    model.unet.to(torch.bfloat16).requires_grad_(False)
    ref = _lora_grads(model, fp8=False)
    got = _lora_grads(model, fp8=True)
    assert got.keys() == ref.keys() and len(got) > 20
    a = torch.cat([g.flatten() for g in got.values()])
    b = torch.cat([g.flatten() for g in ref.values()])
    assert not torch.equal(a, b)  # the base ran in fp8
    assert F.cosine_similarity(a.float(), b.float(), dim=0) > 0.99
    assert rel(a, b) < 0.1
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in got.values())


def test_layers_the_fp8_gemm_cannot_take_are_left_alone():
    odd = frozen_linear(24, 32)  # 24 input features: not a multiple of 16
    strided = frozen_linear(32, 32)
    strided.weight = nn.Parameter(strided.weight.t().contiguous().t(), requires_grad=False)  # column-major
    trained = frozen_linear(32, 32).requires_grad_(True)  # not frozen: it needs a weight gradient
    for lin in (odd, strided, trained):
        with fc.fp8_compute(lin, True, "cpu", "bf16") as n:
            assert n == 0


def test_small_calls_and_calls_without_grad_run_the_hosts_forward():
    lin = frozen_linear(32, 32)
    x, big = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16)
    host, host_big = lin(x), lin(big)
    with fc.fp8_compute(lin, True, "cpu", "bf16", min_rows=5):
        assert torch.equal(lin(x), host)  # 4 rows < 5
        with torch.no_grad():
            assert torch.equal(lin(big), host_big)  # previews sample as the host does
        assert not torch.equal(lin(big), host_big)  # 64 rows with grad: fp8


@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_refused_in_one_line_without_bf16(precision):
    with pytest.raises(ConfigError, match="mixed_precision bf16") as err:
        with fc.fp8_compute(nn.Linear(16, 16), True, "cpu", precision):
            pass
    assert "\n" not in str(err.value)


def test_refused_in_one_line_on_the_cpu_and_on_gpus_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(fc, "ALLOW_CPU", False)
    with pytest.raises(ConfigError, match=r"compute capability 8\.9.*on the CPU") as err:
        with fc.fp8_compute(nn.Linear(16, 16), True, "cpu", "bf16"):
            pass
    assert "\n" not in str(err.value) and "Turn fp8_compute off" in str(err.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has 8\.0") as err:
        with fc.fp8_compute(nn.Linear(16, 16), True, "cuda:0", "bf16"):
            pass
    assert "\n" not in str(err.value)
    with fc.fp8_compute(nn.Linear(16, 16), False, "cpu", "fp16") as n:  # off: nothing is checked
        assert n == 0


def _recording(monkeypatch) -> list:
    made = []
    original = fc.fp8_weight

    def recording(layer, keep_transposed=False):
        made.append((layer, original(layer, keep_transposed)))
        return made[-1][1]

    monkeypatch.setattr(fc, "fp8_weight", recording)
    return made


def test_fp8_base_weights_are_used_as_stored_with_no_second_copy(monkeypatch):
    model = tiny_sd1()
    unet = model.unet.to(torch.bfloat16).requires_grad_(False)
    store_in_fp8(unet)
    before = snapshot(unet)
    made = _recording(monkeypatch)
    messages = []
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    with fc.fp8_compute(unet, True, "cpu", "bf16", say=messages.append) as n:
        assert n == len(made) > 10
        for layer, w in made:
            assert w.q.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
            assert not w.copied and w.q_t is None
        with torch.autocast("cpu", torch.bfloat16):  # fp8_base runs the other layers under autocast
            out = unet(x, torch.tensor([10, 500]), ctx).sample
    with torch.autocast("cpu", torch.bfloat16):
        ref = unet(x, torch.tensor([10, 500]), ctx).sample
    assert rel(out, ref) < 0.1
    assert "0 with an fp8 copy: 0.00 GiB" in messages[0]
    assert same_bits(unet, before)


# --- ComfyUI: a Linear shaped like comfy.ops' manual_cast Linear ------------------------------------
class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class ComfyLinear(nn.Linear, CastWeightBiasOp):
    """comfy.ops.manual_cast.Linear as ComfyUI 0.3.75 runs it: weight and bias cast to the input's
    dtype on every call, then its weight/bias patch functions; `scale_weight` as the scaled-fp8 ops."""
    comfy_cast_weights = True

    def forward_comfy_cast_weights(self, input):
        weight = self.weight.to(input.dtype)
        bias = self.bias.to(input.dtype) if self.bias is not None else None
        scale = getattr(self, "scale_weight", None)
        if scale is not None:
            weight = weight * scale.to(weight.dtype)
        for f in self.weight_function:
            weight = f(weight)
        return F.linear(input, weight, bias)

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


def comfy_fp8_linear(scale: float | None) -> ComfyLinear:
    lin = ComfyLinear(64, 48)
    with torch.no_grad():
        w = lin.weight * 8 if scale is None else lin.weight / scale
        lin.weight = nn.Parameter(w.to(E4M3), requires_grad=False)
        lin.bias = nn.Parameter(lin.bias.to(E4M3), requires_grad=False)  # ComfyUI's fp8 weight_dtype: biases too
    if scale is not None:
        lin.scale_weight = nn.Parameter(torch.tensor(scale), requires_grad=False)
    return lin


@pytest.mark.parametrize("scale", [None, 0.01])
def test_comfyui_fp8_linear_trains_on_its_own_fp8_weights_and_stays_bit_identical(monkeypatch, scale):
    torch.manual_seed(0)
    lin = comfy_fp8_linear(scale)
    before = snapshot(lin)
    x = torch.randn(3, 40, 64, dtype=torch.bfloat16)
    ref_out, ref_dx = run(lin, x, fp8=False)
    made = _recording(monkeypatch)
    out, dx = run(lin, x, fp8=True)
    assert len(made) == 1 and not made[0][1].copied
    assert made[0][1].q.data_ptr() == lin.weight.data_ptr()
    assert rel(out, ref_out) < FP8_RTOL and rel(dx, ref_dx) < FP8_RTOL and not torch.equal(out, ref_out)
    assert same_bits(lin, before) and "forward" not in lin.__dict__


def test_comfyui_linear_with_patch_functions_is_left_to_comfyui():
    lin = comfy_fp8_linear(None)
    lin.weight_function = [lambda w: w * 2]  # a LoRA patch applied per call (ComfyUI's lowvram mode)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    host = lin(x)
    with fc.fp8_compute(lin, True, "cpu", "bf16") as n:
        assert n == 0 and torch.equal(lin(x.requires_grad_(True)), host)


# --- in the trainer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train_fixtures import pattern_dataset

    return pattern_dataset(tmp_path_factory.mktemp("fp8c"), n=4)


def bf16_tiny():
    model = tiny_sd1()
    for module in (model.unet, *model.text_encoders):
        module.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    return model


def test_training_with_fp8_compute_follows_the_bf16_curve_and_gives_the_model_back(data, tmp_path, monkeypatch):
    """With checkpointing, so the recompute runs the fp8 layers too (the step without it is the one
    test_lora_gradients_flow_through_the_fp8_layers runs: LoRA weights cast once, added in place)."""
    from engine.events import FunctionCallback
    from engine.options import EngineOptions
    from engine.train import train
    from train_fixtures import quick_config

    graph_body = EngineOptions(fast_step_without_graph=True)  # the step the CUDA graph replays, without the graph
    opts = dict(max_train_steps=4, batch_size=2, mixed_precision="bf16", device="cpu", seed=3,
                gradient_checkpointing=True)
    model = bf16_tiny()
    before = snapshot(model.unet)
    ref = train(quick_config(data, tmp_path / "ref", **opts), model, options=graph_body)
    messages = []
    got = train(quick_config(data, tmp_path / "fp8", fp8_compute=True, **opts), model, options=graph_body,
                callbacks=[FunctionCallback(lambda e: messages.append(e.message or ""))])
    assert ref.fast_steps == got.fast_steps == 4 and any(m.startswith("fp8_compute: ") for m in messages)
    assert len(got.losses) == len(ref.losses) == 4
    assert got.losses != ref.losses
    for a, b in zip(got.losses, ref.losses):
        assert a == pytest.approx(b, rel=0.05), (got.losses, ref.losses)
    assert same_bits(model.unet, before)
    assert not any("forward" in m.__dict__ for m in model.unet.modules())


def test_training_refuses_fp8_compute_on_the_cpu_before_it_starts(data, tmp_path, monkeypatch):
    from engine.train import train
    from train_fixtures import quick_config

    monkeypatch.setattr(fc, "ALLOW_CPU", False)
    model = bf16_tiny()
    before = snapshot(model.unet)
    with pytest.raises(ConfigError, match="fp8_compute needs a GPU with fp8 tensor cores"):
        train(quick_config(data, tmp_path, fp8_compute=True, mixed_precision="bf16", device="cpu"), model)
    assert same_bits(model.unet, before)
