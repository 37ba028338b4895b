"""The diffusers + PEFT reference loop on Flux.1-dev, as `examples/dreambooth/train_dreambooth_lora_flux.py`
runs it (tool `diffusers-peft`, model `flux1`).

What the script does and we keep: `FluxTransformer2DModel` frozen in bf16, PEFT
`LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian")` on the script's default
`target_modules` (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, ff.net.0.proj/2 and
ff_context.net.0.proj/2: 12 per double block, to_q/k/v of each single block, 342 modules), LoRA
parameters upcast to fp32 (`cast_training_params`; tool `diffusers-peft-bf16` leaves them bf16, as the
script does under `--mixed_precision bf16`: it upcasts only for fp16), `Accelerator(mixed_precision="bf16")`,
`torch.optim.AdamW` (weight decay 1e-4 as the script's default), `enable_gradient_checkpointing()` as
the row asks. Per step, with latents and prompt embeddings cached (`--cache_latents`, one instance
prompt): `FluxPipeline._pack_latents`, `_prepare_latent_image_ids`, timesteps drawn by
`compute_density_for_timestep_sampling("none")` from the FLUX.1-dev scheduler (shift 3.0 with
dynamic shifting, so plain sigmas), noisy = (1 - sigma) x + sigma noise, guidance 3.5 (the script's
default), prediction unpacked, MSE against noise - x with `compute_loss_weighting_for_sd3("none")`,
`clip_grad_norm_(1.0)`, `loss.detach().item()` every step.

    python -m bench.peer_diffusers_flux --configs '[...]'
"""

from __future__ import annotations

import sys

from .common import RANK, StepClock, emit, error_row, finish_row, log, parse_configs, reset_memory
from .workload_flux import MODEL, build_random, dims, random_latents, random_text

TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2"]


def build_transformer():
    from diffusers import FluxTransformer2DModel

    d = dims()
    return build_random(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=d.in_channels, num_layers=d.depth, num_single_layers=d.depth_single,
        attention_head_dim=128, num_attention_heads=d.heads, joint_attention_dim=d.context_in,
        pooled_projection_dim=d.vec_in, guidance_embeds=d.guidance_embed, axes_dims_rope=(16, 56, 56)))


def run_config(transformer, cfg):
    import torch
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                          compute_loss_weighting_for_sd3)
    from peft import LoraConfig

    # torch 2.11's cuDNN attention fails on diffusers' Flux backward at 4608 tokens ("mha_graph.execute ...
    # is_good()", H200, 2026-12-07); the flash/efficient kernels that a default install falls back to run it
    torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision="bf16")
    weight_dtype = torch.bfloat16
    dev = accelerator.device
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    if cfg.tool != "diffusers-peft-bf16":  # the script: `if args.mixed_precision == "fp16": cast_training_params(...)`
        cast_training_params(transformer, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=cfg.warmup + cfg.steps)
    transformer_p, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    sched_sigmas, sched_timesteps = scheduler.sigmas.to(dev), scheduler.timesteps.to(dev)

    b = cfg.batch
    prompt_embeds, pooled = (t.to(weight_dtype) for t in random_text(b))
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=dev, dtype=weight_dtype)
    latents_all = random_latents(b)
    clock = StepClock()
    for step in range(cfg.warmup + cfg.steps + 1):
        if step == 0:  # peak over every training step, the first included, as for the other tools
            reset_memory()
        elif step == 1:
            clock.start()
        else:
            clock.tick()
        if step == cfg.warmup + cfg.steps:
            break
        with accelerator.accumulate(transformer_p):
            model_input = latents_all.to(weight_dtype)  # cached latents, already (x - shift) * scale
            _, c, h, w = model_input.shape
            image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, weight_dtype)
            noise = torch.randn_like(model_input)
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b, logit_mean=0.0,
                                                      logit_std=1.0, mode_scale=1.29)
            timesteps = sched_timesteps[(u * 1000).long().to(dev)]
            idx = [(sched_timesteps == t).nonzero().item() for t in timesteps]
            sigmas = sched_sigmas[idx].flatten().to(model_input.dtype).view(-1, 1, 1, 1)
            noisy = (1.0 - sigmas) * model_input + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c, height=h, width=w)
            guidance = torch.tensor([3.5], device=dev).expand(b) if dims().guidance_embed else None
            pred = transformer_p(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                 img_ids=image_ids, return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, height=h * 8, width=w * 8, vae_scale_factor=8)
            weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            loss.detach().item()
    row = finish_row(cfg, clock.step_times(cfg.warmup - 1), b,
                     notes=[f"PEFT on the script's default layers ({len(params) // 2} modules), LoRA weights in "
                            f"{'/'.join(sorted({str(p.dtype).replace('torch.', '') for p in params}))}"])
    accelerator.free_memory()
    return row


def main(argv=None):
    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    for cfg in configs:
        reset_memory()
        if cfg.model != MODEL or not cfg.cached:
            emit(error_row(cfg, f"not measured: {__name__} runs {MODEL} with cached latents and text only"))
            continue
        transformer = None
        try:
            transformer = build_transformer()  # fresh per row: PEFT wrappers stay in a module once added
            row = run_config(transformer, cfg)
        except Exception as exc:  # noqa: BLE001
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc)
        emit(row)
        del transformer


if __name__ == "__main__":
    main()
