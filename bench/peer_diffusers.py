"""The diffusers + PEFT reference loop, as diffusers' LoRA training examples run it.

`examples/text_to_image/train_text_to_image_lora.py` (SD1.x) and `train_text_to_image_lora_sdxl.py`:
frozen UNet cast to the mixed-precision dtype, PEFT `LoraConfig(r, lora_alpha=r,
init_lora_weights="gaussian", target_modules=...)` added with `unet.add_adapter`. Tool `diffusers-peft`
targets the workload's layers, kohya's defaults (attention, feed-forward and proj_in/out of every
transformer block: the same 192 / 722 modules ours trains); `diffusers-peft-attn` keeps the scripts'
own `["to_k", "to_q", "to_v", "to_out.0"]` (128 / 560). LoRA parameters upcast to fp32
(`cast_training_params`, as ours keeps float32 masters); `diffusers-peft-bf16` is the loop as the
scripts really run it under `--mixed_precision bf16`: they upcast only for fp16, so the LoRA weights
stay in the UNet's bf16 and AdamW updates them there (the row's notes give the dtype).
`Accelerator(mixed_precision="bf16")` (autocast), `torch.optim.AdamW` with
its defaults, `clip_grad_norm_(1.0)`, `F.mse_loss` on eps, `accelerator.gather(loss).mean().item()`
every step. The scripts encode images
with the VAE every step (bf16 for SD1.x, fp32 for SDXL); the cached rows feed latents and text
conditioning directly, the uncached row runs the VAE on a fresh pixel batch every step.
"""

from __future__ import annotations

import sys

from .common import RANK, SEED, StepClock, WORKLOADS, emit, error_row, finish_row, log, parse_configs, reset_memory
from .workload import build_unet, build_vae, random_cond, random_latents

TARGETS = {  # tool -> PEFT target_modules
    "diffusers-peft": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "diffusers-peft-attn": ["to_k", "to_q", "to_v", "to_out.0"],
    "diffusers-peft-bf16": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}


def run_config(unet, vae, cfg):
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    w = WORKLOADS[cfg.model]
    sdxl = w["family"] == "sdxl"
    accelerator = Accelerator(mixed_precision="bf16")
    weight_dtype = torch.bfloat16
    targets = TARGETS[cfg.tool]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    if cfg.tool != "diffusers-peft-bf16":  # the scripts: `if args.mixed_precision == "fp16": cast_training_params(...)`
        cast_training_params(unet, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in lora_layers})
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=cfg.warmup + cfg.steps)
    unet_p, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)

    b = cfg.batch
    ctx, pooled = random_cond(cfg.model, b)
    ctx = ctx.to(weight_dtype)
    latents_all = random_latents(cfg.model, b)
    size = w["resolution"]
    pixels = torch.rand(b, 3, size, size, device="cuda") * 2 - 1
    added = None
    if sdxl:
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device="cuda", dtype=weight_dtype).repeat(b, 1)
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids}
    clock = StepClock()
    train_loss = 0.0
    for step in range(cfg.warmup + cfg.steps + 1):
        if step == 0:  # peak over every training step, the first included, as for the other tools
            reset_memory()
        elif step == 1:
            clock.start()
        elif step > 1:
            clock.tick()
        if step == cfg.warmup + cfg.steps:
            break
        with accelerator.accumulate(unet_p):
            if cfg.cached:
                latents = latents_all
            else:  # as the scripts do, every step
                vae_dtype = torch.float32 if sdxl else weight_dtype
                latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
                latents = latents.to(weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps.long())
            kwargs = {"added_cond_kwargs": added} if sdxl else {}
            model_pred = unet_p(noisy, timesteps, ctx, return_dict=False, **kwargs)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            avg_loss = accelerator.gather(loss.repeat(b)).mean()
            train_loss += avg_loss.item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
    # steps 1..N+W: the first interval starts after step 0 (CUDA/cuBLAS warm-up), warm-up dropped
    row = finish_row(cfg, clock.step_times(cfg.warmup - 1), b,
                     notes=[f"PEFT on {'/'.join(targets)} ({len(lora_layers) // 2} modules), LoRA weights in "
                            f"{'/'.join(lora_dtypes)}"])
    accelerator.free_memory()
    return row


def main(argv=None):
    import torch

    configs = parse_configs(sys.argv[1:] if argv is None else argv)
    for cfg in configs:
        reset_memory()
        unet = vae = None
        try:
            unet = build_unet(cfg.model)  # fresh per row: PEFT wrappers stay in a module once added
            if not cfg.cached:
                sdxl = WORKLOADS[cfg.model]["family"] == "sdxl"
                vae = build_vae(cfg.model, dtype=torch.float32 if sdxl else torch.bfloat16)
            row = run_config(unet, vae, cfg)
        except Exception as exc:  # noqa: BLE001
            log(f"{cfg}: {type(exc).__name__}: {exc}")
            row = error_row(cfg, exc)
        emit(row)
        del unet, vae


if __name__ == "__main__":
    main()
