"""The diffusers adapter through the seam: tokenizers, encoders, predict, session, previews."""

import hashlib

import pytest
import torch
from torch import nn

from engine.errors import ConfigError
from engine.families.clip import kohya_te_key
from engine.models.clip_tokenizer import clip_tokenizer, tokenize
from engine.models.diffusers_adapter import DiffusersModel
from engine.models.tiny import tiny_sd1, tiny_sdxl


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=0)


# Reference ids from OpenAI CLIP's own tokenizer (open_clip SimpleTokenizer on the same BPE file).
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Photo  of a CAT!!": [49406, 320, 1125, 539, 320, 2368, 748, 49407],
    "sks dog in a bucket": [49406, 48136, 1929, 530, 320, 10498, 49407],
    "1girl, solo, long hair, café, 日本": [49406, 272, 1611, 267, 5797, 267, 1538, 2225, 267, 15304, 267,
                                          39121, 19277, 361, 49407],
}


@pytest.mark.parametrize("text", list(KNOWN))
def test_tokenizer_ids_match_clip(text):
    ids = KNOWN[text]
    eos_padded = tokenize(clip_tokenizer(), [text], pad_id=49407)[0].tolist()
    bang_padded = tokenize(clip_tokenizer(), [text], pad_id=0)[0].tolist()
    assert len(eos_padded) == len(bang_padded) == 77
    assert eos_padded[:len(ids)] == bang_padded[:len(ids)] == ids
    assert set(eos_padded[len(ids):]) == {49407}  # SD1 / SDXL te1 pad with <|endoftext|>
    assert set(bang_padded[len(ids):]) == {0}  # SD2 / SDXL te2 pad with "!"


def test_long_captions_are_truncated_with_eos_last():
    ids = tokenize(clip_tokenizer(), ["cat " * 200])[0].tolist()
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1] == [2368] * 75


def test_padding_per_family(sd1, sdxl):
    assert sd1.pad_ids == [49407] and sdxl.pad_ids == [49407, 0]
    # "!" in a caption stays BPE token 748 even where padding is id 0 ("!")
    ids = tokenize(sdxl.tokenizers[1], ["cat!!"], pad_id=0)[0].tolist()
    assert ids[:4] == [49406, 2368, 748, 49407] and set(ids[4:]) == {0}


def test_encode_images_is_the_scaled_latent_mean(sd1):
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    lat = sd1.encode_images(pixels)
    assert lat.shape == (2, 4, 8, 6) and lat.dtype == torch.float32
    assert torch.equal(lat, sd1.encode_images(pixels))  # deterministic: cacheable
    with torch.no_grad():
        mean = sd1.vae.encode(pixels).latent_dist.mean
    assert torch.allclose(lat, mean * 0.18215)


def test_encode_text_sd1_and_clip_skip(sd1):
    cond = sd1.encode_text(["a photo of a cat", "sks dog"])
    assert set(cond) == {"context"} and cond["context"].shape == (2, 77, 32)
    te = sd1.text_encoders[0]
    skipped = DiffusersModel.from_components(unet=sd1.unet, vae=sd1.vae, text_encoders=[te], tokenizers=sd1.tokenizers,
                                             family="sd1", clip_skip=2)
    ctx2 = skipped.encode_text(["a photo of a cat"])["context"]
    with torch.no_grad():
        hidden = te(tokenize(sd1.tokenizers[0], ["a photo of a cat"], 49407), output_hidden_states=True).hidden_states
        final_norm = te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm
        assert torch.allclose(ctx2, final_norm(hidden[-2]))
    assert not torch.allclose(ctx2, cond["context"][:1])
    assert skipped.info.clip_skip == 2


def test_encode_text_sdxl_concatenates_penultimate_layers_and_pools_te2(sdxl):
    cond = sdxl.encode_text(["a photo of a cat", ""])
    assert cond["context"].shape == (2, 77, 64) and cond["pooled"].shape == (2, 32)
    (te1, te2), (tok1, tok2) = sdxl.text_encoders, sdxl.tokenizers
    with torch.no_grad():
        h1 = te1(tokenize(tok1, ["a photo of a cat"]), output_hidden_states=True).hidden_states[-2]
        out2 = te2(tokenize(tok2, ["a photo of a cat"], pad_id=0), output_hidden_states=True)
    assert torch.allclose(cond["context"][:1], torch.cat([h1, out2.hidden_states[-2]], -1))
    assert torch.allclose(cond["pooled"][:1], out2.text_embeds)


def test_predict_shapes_and_sdxl_size_conditioning(sd1, sdxl):
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert sd1.predict(noisy, t, sd1.encode_text(["a", "b"])).shape == (2, 4, 8, 8)
        cond = sdxl.encode_text(["a", "b"])
        small = {**cond, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
        big = {**cond, "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, dtype=torch.float32)}
        out_small, out_big = sdxl.predict(noisy, t, small), sdxl.predict(noisy, t, big)
    assert out_small.shape == (2, 4, 8, 8)
    assert not torch.allclose(out_small, out_big)


def test_layers_schedule_and_info(sd1, sdxl):
    unet_layers = dict(sd1.unet_layers())
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet_layers.values())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in unet_layers
    assert "down_blocks.0.resnets.0.conv1" in unet_layers and "conv_in" in unet_layers
    te = [(p, n) for p, n, _ in sdxl.text_encoder_layers()]
    assert ("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj") in te
    assert ("lora_te2", "text_model.encoder.layers.1.mlp.fc2") in te
    assert kohya_te_key(*te[0]).startswith("lora_te1_text_model_encoder_layers_0_")
    assert {p for p, _, _ in sd1.text_encoder_layers()} == {"lora_te"}
    objective = sd1.objective()
    acp = objective.alphas_cumprod
    assert objective.kind == "ddpm" and objective.prediction_type == "epsilon"
    assert acp.shape == (1000,) and acp.dtype == torch.float32 and acp.device.type == "cpu"
    assert acp[0].item() == pytest.approx(1 - 0.00085) and acp[-1].item() == pytest.approx(0.00466, abs=2e-5)
    assert sdxl.info.family == "sdxl" and sdxl.info.spec.batch_conditioning == ("time_ids",)
    assert sd1.info.spec.batch_conditioning == ()
    assert sdxl.info.layout.down_attn == (False, True) and sd1.info.layout.down_attn == (True, False)


def _snapshot(model):
    """Everything a host would notice: values, dtypes, devices, grad flags, modes, GC attributes,
    `forward` overrides."""
    state = []
    for root in (model.unet, model.vae, *model.text_encoders):
        digest = hashlib.sha256()
        for k, v in root.state_dict().items():
            digest.update(k.encode())
            digest.update(str((v.dtype, v.device, tuple(v.shape))).encode())
            digest.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        state.append(digest.hexdigest())
        state.append([(n, p.requires_grad, id(p)) for n, p in root.named_parameters()])
        state.append([(n, m.training, {a: m.__dict__[a] for a in ("gradient_checkpointing", "forward",
                                                                   "_gradient_checkpointing_func") if a in m.__dict__})
                      for n, m in root.named_modules()])
    state.append(sorted((k, type(v).__name__) for k, v in model.unet.attn_processors.items()))
    return state


def _borrowed(build):
    """A caller's model: not owned, some flags set the way a host might have them."""
    own = build(seed=5)
    model = DiffusersModel.from_components(unet=own.unet, vae=own.vae, text_encoders=own.text_encoders,
                                           tokenizers=own.tokenizers, family=own.info.family, owns_weights=False)
    model.unet.conv_out.weight.requires_grad_(True)
    model.text_encoders[0].train()
    return model


def _delta_for(layer: nn.Module) -> nn.Module:
    """A trainable layer whose output is added to `layer`'s (a stand-in for a LoRA module)."""
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, 1, bias=False)
    return nn.Linear(layer.in_features, layer.out_features, bias=False)


def _train_step(model, hooked: nn.Module, delta: nn.Module):
    handle = hooked.register_forward_hook(lambda mod, args, out: out + delta(args[0]))
    try:
        latents = model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
        cond = model.encode_text(["a photo of a cat"])
        pred = model.predict(torch.randn_like(latents), torch.tensor([500]), cond)
        pred.float().pow(2).mean().backward()
    finally:
        handle.remove()


@pytest.mark.parametrize("build", [tiny_sd1, tiny_sdxl])
def test_borrowed_model_comes_back_bit_identical_after_a_crash(build):
    model = _borrowed(build)
    before = _snapshot(model)
    te_linear = dict((n, m) for _, n, m in model.text_encoder_layers())["text_model.encoder.layers.0.self_attn.q_proj"]
    delta = nn.Linear(te_linear.in_features, te_linear.out_features, bias=False)
    with pytest.raises(RuntimeError, match="boom"):
        with model.session(gradient_checkpointing=True, train_text_encoder=True):
            # each module with the flag is checkpointed: by its flag, or whole through its forward
            gc_flags = [m.gradient_checkpointing or "forward" in m.__dict__
                        for m in model.unet.modules() if hasattr(m, "gradient_checkpointing")]
            assert gc_flags and all(gc_flags)
            assert not any(p.requires_grad for r in model.trainable_roots() for p in r.parameters())
            _train_step(model, te_linear, delta)
            assert delta.weight.grad is not None and delta.weight.grad.abs().sum() > 0
            raise RuntimeError("boom")
    assert _snapshot(model) == before


@pytest.mark.parametrize("layer", ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
                                   "down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_out"])
def test_gradient_checkpointing_gives_the_same_gradients(sd1, layer):
    target = sd1.unet.get_submodule(layer)
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        delta = _delta_for(target)
        with sd1.session(gradient_checkpointing=gc, train_text_encoder=False):
            torch.manual_seed(1)
            _train_step(sd1, target, delta)
        grads.append(delta.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("build", [tiny_sd1, tiny_sdxl])
def test_checkpointing_holds_nothing_inside_a_single_block_transformer(build):
    """A one-block transformer (all of SD1's) is recomputed whole: with checkpointing on, nothing it
    makes (norm, projections, their LoRA) is held for backward, only its inputs. Multi-block ones
    (SDXL's) are still checkpointed block by block, so their norm and projections are held."""
    model = build(seed=0)
    transformers = [m for m in model.unet.modules() if hasattr(m, "transformer_blocks")]
    target = transformers[0].proj_in
    inside: dict[int, int] = {}
    current = []  # (index, data pointers of its inputs) of the transformer running now

    def pack(t):
        if current and t.data_ptr() not in current[-1][1]:
            inside[current[-1][0]] = inside.get(current[-1][0], 0) + t.numel()
        return t

    def enter(_mod, args, kwargs, i):
        current.append((i, {a.data_ptr() for a in (*args, *kwargs.values()) if torch.is_tensor(a)}))

    def leave(*_):
        current.pop()

    hooks = [h for i, m in enumerate(transformers) for h in (
        m.register_forward_pre_hook(lambda *a, i=i: enter(*a, i), with_kwargs=True), m.register_forward_hook(leave))]
    held = {}
    for gc in (False, True):
        inside.clear()
        delta = _delta_for(target)
        with model.session(gradient_checkpointing=gc, train_text_encoder=False):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _train_step(model, target, delta)
        assert delta.weight.grad.abs().sum() > 0
        held[gc] = dict(inside)
    for h in hooks:
        h.remove()
    assert all(held[False].get(i) for i in range(len(transformers)))  # the probe sees what is held
    for i, m in enumerate(transformers):
        if len(m.transformer_blocks) == 1:
            assert i not in held[True], f"transformer {i} held {held[True][i]} values for backward"
        else:
            assert held[True].get(i), "a multi-block transformer is not recomputed whole"
    blocks = {len(m.transformer_blocks) for m in transformers}
    assert blocks == ({1} if build is tiny_sd1 else {2}), blocks  # both kinds are exercised


def test_fp16_sdxl_vae_is_encoded_in_fp32_and_given_back_unchanged():
    model = _borrowed(tiny_sdxl)
    model.vae.half()
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    lat = model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    after = model.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], before[k]) for k in before)


def test_xformers_missing_is_a_clear_error(sd1):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here; the error path cannot be exercised")
    except ImportError:
        pass
    model = DiffusersModel.from_components(unet=sd1.unet, vae=sd1.vae, text_encoders=sd1.text_encoders,
                                           tokenizers=sd1.tokenizers, family="sd1", attention="xformers")
    with pytest.raises(ConfigError, match="attention: sdpa"):
        with model.session(False, False):
            pass


@pytest.mark.parametrize("build", [tiny_sd1, tiny_sdxl])
def test_sample_is_seeded_and_sees_lora_hooks(build):
    model = build(seed=0)
    kw = dict(seed=7, steps=2, cfg=5.0, width=64, height=48)
    first, second = model.sample(["a cat", "a dog"], **kw), model.sample(["a cat"], **kw)
    assert len(first) == 2 and first[0].size == (64, 48)
    assert first[0].tobytes() == second[0].tobytes()
    unet_layer = dict(model.unet_layers())["up_blocks.1.attentions.0.proj_out" if model.info.family == "sd1"
                                           else "up_blocks.0.attentions.0.proj_out"]
    handle = unet_layer.register_forward_hook(lambda mod, args, out: out + 0.5)
    try:
        assert model.sample(["a cat"], **kw)[0].tobytes() != first[0].tobytes()
    finally:
        handle.remove()
    te_layer = next(m for _, n, m in model.text_encoder_layers() if n.endswith("layers.0.mlp.fc2"))
    handle = te_layer.register_forward_hook(lambda mod, args, out: out * 3.0)
    try:
        assert model.sample(["a cat"], **kw)[0].tobytes() != first[0].tobytes()
    finally:
        handle.remove()


def test_from_pipeline_reads_family_and_prediction_type(sd1):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=sd1.vae, text_encoder=sd1.text_encoders[0], tokenizer=sd1.tokenizers[0],
                                   unet=sd1.unet, scheduler=DDIMScheduler(prediction_type="v_prediction", steps_offset=1,
                                                                   clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    model = DiffusersModel.from_pipeline(pipe)
    assert model.info.family == "sd1" and model.info.prediction_type == "v_prediction"
    assert not model.owns_weights and model.info.resolution == 64
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
