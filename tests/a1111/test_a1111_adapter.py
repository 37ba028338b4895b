"""The A1111 adapter on A1111-shaped tiny models: encoding, the SDXL vector, the exact schedule, and
training through the engine that leaves the WebUI's model, options and flags exactly as they were."""

import hashlib

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import ModelError
from engine.lora.kohya_io import read_lora
from engine.models import tiny_sd1
from engine.train import train
from fake_models import FakeSD1, FakeSD2, FakeSDXL
from fake_webui import SdConditioning, load_model
from inplace_lora_a1111.adapter import A1111Model, exact_alphas_cumprod


def fingerprint(model: torch.nn.Module) -> dict:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"values": h.hexdigest(), "grad": tuple(p.requires_grad for p in model.parameters()),
            "modes": tuple(m.training for m in model.modules()),
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            "forwards": sum("forward" in m.__dict__ for m in model.modules()),
            "trainable": tuple(getattr(m, "is_trainable", None) for m in model.modules())}


def config(data, out, **changes):
    base = dict(train_data_dir=str(data), output_dir=str(out), output_name="t", resolution="64", batch_size=2,
                max_train_steps=3, learning_rate=1e-2, save_every_n_epochs=0, save_precision="fp32",
                lr_scheduler="constant")
    base.update(changes)
    return TrainConfig(**base)


def test_latents_are_the_vae_mean_scaled(webui):
    sd = FakeSD1(webui.shared.opts)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    reference = tiny_sd1().encode_images(pixels)  # the standalone path: mean x 0.18215, no sampling
    assert torch.allclose(A1111Model(sd).encode_images(pixels), reference, atol=1e-6)


def test_captions_are_encoded_through_the_hijack_plainly(webui):
    sd = FakeSD1(webui.shared.opts)
    model = A1111Model(sd)
    hijack = webui.sd_hijack.model_hijack
    hijack.extra_generation_params["TI hashes"] = "x: 1"
    with model.session(False, False):
        cond = model.encode_text(["a (cat)", "a dog"])
        hijack.extra_generation_params["Emphasis"] = "None"  # what A1111 notes for "(cat)"
    assert cond["context"].shape == (2, 77, 32)  # a second 77-token chunk is cut, as kohya does
    assert sd.cond_stage_model.emphasis_seen == ["None"]
    assert webui.shared.opts.data["emphasis"] == "Original"
    assert hijack.extra_generation_params == {"TI hashes": "x: 1"}


def test_clip_skip_is_set_for_the_run_only(webui):
    sd = FakeSD1(webui.shared.opts)
    seen = []
    sd.cond_stage_model.register_forward_pre_hook(lambda *_: seen.append(webui.shared.opts.data[
        "CLIP_stop_at_last_layers"]))
    model = A1111Model(sd, clip_skip=2)
    with model.session(False, False):
        model.encode_text(["x"])
    assert seen == [2] and webui.shared.opts.data["CLIP_stop_at_last_layers"] == 1


def test_schedule_is_exact_not_the_fp16_buffer(webui):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    ours = exact_alphas_cumprod(FakeSD1(webui.shared.opts))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert not torch.equal(ours, ours.half().float())  # what an fp16 checkpoint buffer would hold


def test_sdxl_vector_is_pooled_then_size_embeddings(webui):
    sd = FakeSDXL(webui.shared.opts)
    model = A1111Model(sd)
    with torch.no_grad():
        cond = model.encode_text(["a cat", "a dog"])
        assert cond["context"].shape == (2, 77, 64) and cond["pooled"].shape == (2, 32)
        time_ids = torch.tensor([[64.0, 96.0, 0, 0, 64, 96]] * 2)
        x, t = torch.randn(2, 4, 8, 12), torch.tensor([10, 900])
        ours = model.predict(x, t, {**cond, "time_ids": time_ids})
        direct = sd.apply_model(x, t, sd.get_learned_conditioning(SdConditioning(["a cat", "a dog"], 96, 64)))
    assert torch.allclose(ours, direct, atol=1e-5)


@pytest.mark.parametrize("make, te_prefixes", [(FakeSD1, ["lora_te_"]), (FakeSD2, ["lora_te_"]),
                                               (FakeSDXL, ["lora_te1_", "lora_te2_"])])
def test_training_in_place_leaves_the_model_as_it_was(webui, dataset, tmp_path, make, te_prefixes):
    sd = make(webui.shared.opts)
    load_model(webui, sd)
    before = fingerprint(sd)
    assert before["grad"] and all(p.requires_grad for p in sd.model.diffusion_model.parameters())
    cfg = config(dataset, tmp_path, train_text_encoder=True, gradient_checkpointing=True)
    result = train(cfg, A1111Model(sd))
    assert fingerprint(sd) == before
    assert webui.shared.opts.data == {"emphasis": "Original", "CLIP_stop_at_last_layers": 1}
    tensors, meta = read_lora(result.lora_path)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[
        A1111Model(sd).family]
    for prefix in te_prefixes + ["lora_unet_"]:
        ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and sum(bool(u.abs().sum() > 0) for u in ups) > len(ups) // 2, prefix  # it learned


def test_sd2_fused_attention_trains_all_four_projections(webui, dataset, tmp_path):
    sd = FakeSD2(webui.shared.opts)
    load_model(webui, sd)
    tower = sd.cond_stage_model.wrapped.model
    keys_before = list(tower.state_dict())
    cfg = config(dataset, tmp_path, train_text_encoder=True, target_modules="attention")
    tensors, _ = read_lora(train(cfg, A1111Model(sd)).lora_path)
    for slot in ("q", "k", "v", "out"):
        for layer in (0, 1):  # layer 2 is never run (penultimate), so it is not trained or saved
            up = tensors[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{slot}_proj.lora_up.weight"]
            assert up.abs().sum() > 0, (slot, layer)
        assert not any("layers_2_" in k for k in tensors)
    assert list(tower.state_dict()) == keys_before
    assert not any("forward" in m.__dict__ for m in tower.modules())


def test_refusals_are_explained(webui):
    sd = FakeSD1(webui.shared.opts)
    model = A1111Model(sd)
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(ModelError, match="--lowvram"):
        with model.session(False, False):
            pass
    webui.shared.cmd_opts.lowvram, webui.shared.cmd_opts.medvram = False, True
    with pytest.raises(ModelError, match="--medvram"):
        with model.session(False, True):
            pass
    with model.session(False, False):  # UNet-only training is allowed with --medvram
        pass
    assert fingerprint(sd)["forwards"] == 0


def test_an_overflowing_fp16_vae_is_encoded_again_in_fp32(webui):
    sd = FakeSD1(webui.shared.opts)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    reference = A1111Model(sd).encode_images(pixels)
    vae = sd.first_stage_model.half()
    vae.quant_conv.register_forward_hook(lambda m, a, out: out * float("inf") if out.dtype == torch.float16 else out)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    latents = A1111Model(sd).encode_images(pixels)
    assert torch.isfinite(latents).all() and torch.allclose(latents, reference, atol=1e-2)
    assert all(v.dtype == torch.float16 and torch.equal(v, before[k]) for k, v in vae.state_dict().items())
