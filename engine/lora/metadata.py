"""The header metadata kohya writes (`ss_*`, `modelspec.*`), which A1111, Forge and Civitai read.

A1111 files a LoRA under a model version from `ss_base_model_version` (`sdxl_...`) and `ss_v2`, names
its card from `ss_output_name`, and builds the training-tags list from `ss_tag_frequency`. Every value
is a string, as in kohya's files. What names the model (version, `ss_v2`, modelspec architecture and
implementation) is the family's (engine/families).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from ..config import TrainConfig
from ..model import ModelInfo
from .blocks import network_args as block_network_args
from .variants.lycoris_args import network_metadata

PRODUCT = "inplace-lora-trainer"


def _s(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "None"
    return str(value)


def build_metadata(cfg: TrainConfig, info: ModelInfo, *, data_summary: dict, steps: int, epoch: int,
                   total_steps: int, batches_per_epoch: int, started_at: float, mixed_precision: str,
                   session_id: str | None = None, extra: dict[str, Any] | None = None, processes: int = 1
                   ) -> dict[str, str]:
    """Metadata for a LoRA written after `steps` optimizer steps (also for intermediate saves); `processes`:
    the GPUs of a several-GPU run (kohya's total batch counts them)."""
    spec = info.spec
    version = spec.version(info.prediction_type)
    width, height = data_summary.get("resolution", (info.resolution, info.resolution))
    alpha = cfg.alpha
    network_args: dict[str, Any] = {}
    if cfg.target_modules == "locon":
        network_args = {"conv_dim": str(cfg.conv_dim), "conv_alpha": str(cfg.conv_alpha_value)}
    elif cfg.target_modules != "kohya":
        network_args = {"target_modules": cfg.target_modules}
    network_args.update(block_network_args(cfg))  # down_lr_weight, block_dims, ... as kohya writes them
    network_module, network_args = network_metadata(cfg, network_args)
    md: dict[str, Any] = {
        "ss_session_id": _session_int(session_id),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else None,
        "ss_num_train_images": data_summary.get("num_train_images", 0),
        "ss_num_reg_images": data_summary.get("num_reg_images", 0),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": cfg.epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": total_steps,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * processes * cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": cfg.warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": network_module,
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_network_args": network_args or None,
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_fp8_base": cfg.fp8_base,
        "ss_v2": spec.kohya_v2,
        "ss_base_model_version": version,
        "ss_clip_skip": cfg.clip_skip or None,
        "ss_max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
        "ss_cache_latents": cfg.cache_latents != "off",
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma or None,  # input perturbation: both objectives apply it
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength or None,
        "ss_optimizer": f"{cfg.optimizer}({_optimizer_args(cfg)})",
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs or None,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate or None,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_flip_aug": cfg.flip_aug,
        "ss_color_aug": bool(cfg.color_jitter),
        "ss_random_crop": cfg.random_crop,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_resolution": f"({width}, {height})",
        "ss_bucket_info": data_summary.get("bucket_info"),
        "ss_dataset_dirs": data_summary.get("dataset_dirs", {}),
        "ss_reg_dataset_dirs": data_summary.get("reg_dataset_dirs", {}),
        "ss_tag_frequency": data_summary.get("tag_frequency", {}),
        "ss_sd_model_name": info.name,
        "ss_new_sd_model_hash": info.sha256,
        "ss_training_comment": cfg.training_comment or None,
        "ss_loss_type": "l2",
        "ss_ema_decay": cfg.ema_decay or None,
        "ss_masked_loss": cfg.masked_loss or cfg.alpha_mask or None,
        "ss_validation_split": cfg.validation_split or None,
        "ss_validation_seed": cfg.validation_seed if cfg.validation_split or cfg.validation_data_dir else None,
        "ss_max_validation_steps": cfg.max_validation_steps or None,
        "ss_num_validation_images": data_summary.get("num_validation_images"),
        "ss_alpha_mask": cfg.alpha_mask or None,
        "ss_ema_start_step": cfg.ema_start_step if cfg.ema_decay else None,
        # modelspec (SAI model spec 1.0.1), as kohya writes it
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": spec.architecture(info.prediction_type, info.variant),
        "modelspec.implementation": spec.implementation,
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
        "modelspec.timestep_range": "0,1000",
    }
    md.update(flow_metadata(cfg, info) if spec.objective == "flow" else ddpm_metadata(cfg))
    if cfg.clip_skip:
        md["modelspec.encoder_layer"] = cfg.clip_skip
    if cfg.trigger_word:
        md["modelspec.trigger_phrase"] = cfg.trigger_word
    if extra:
        md.update(extra)
    return {k: _s(v) for k, v in md.items() if v is not None}


def ddpm_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """The options only the DDPM objective reads (engine/objectives/ddpm.py, noise.py): a flow model's
    file does not claim them."""
    return {"ss_min_snr_gamma": cfg.min_snr_gamma or None,
            "ss_multires_noise_iterations": cfg.multires_noise_iterations or None,
            "ss_multires_noise_discount": cfg.multires_noise_discount if cfg.multires_noise_iterations else None}


def flow_metadata(cfg: TrainConfig, info: ModelInfo) -> dict[str, Any]:
    """What kohya's flux_train_network.py adds for a flow model (`update_metadata`), and no modelspec
    prediction type (kohya writes none for Flux)."""
    sampling = cfg.timestep_sampling if cfg.timestep_sampling != "auto" else info.spec.timestep_sampling
    return {"modelspec.prediction_type": None, "modelspec.timestep_range": None,
            "ss_timestep_sampling": sampling, "ss_sigmoid_scale": cfg.sigmoid_scale,
            "ss_discrete_flow_shift": cfg.discrete_flow_shift, "ss_weighting_scheme": cfg.weighting_scheme,
            "ss_logit_mean": cfg.logit_mean, "ss_logit_std": cfg.logit_std, "ss_mode_scale": cfg.mode_scale,
            "ss_guidance_scale": cfg.guidance_scale if info.variant != "schnell" else None,
            "ss_model_prediction_type": "raw", "ss_apply_t5_attn_mask": False,
            "ss_model_type": info.variant or None}


def _session_int(session_id: str | None) -> str:
    """kohya writes a random integer (< 2**32), and metadata tools parse it with int(); a non-numeric
    run id is mapped to a stable integer so every save of one run shares it."""
    if session_id is None:
        return str(uuid.uuid4().int % 2**32)
    if session_id.isdigit():
        return session_id
    return str(int(hashlib.sha256(session_id.encode()).hexdigest(), 16) % 2**32)


def _optimizer_args(cfg: TrainConfig) -> str:
    args = {"weight_decay": cfg.weight_decay, **cfg.optimizer_args}
    return ",".join(f"{k}={v}" for k, v in args.items())
