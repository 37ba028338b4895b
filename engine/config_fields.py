"""The one training config's field table: every setting, its default, documentation and allowed values.

YAML/TOML files, ComfyUI node inputs and the A1111 tab all map onto `TrainConfig`. Defaults are the
ones the field has settled on for SD LoRA (rank 16, alpha = rank/2, AdamW at 1e-4 for the UNet, cosine
schedule with 5% warmup, buckets on, latents cached). How a file or mapping becomes a `TrainConfig`
(groups, kohya sections and keys, aliases, value coercion) is engine/config_io.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _f(default, help: str, *, choices=None, aliases=(), group="train", path=None, minimum=None, from_bool=None,
       synonyms=None):
    """A config field with its documentation, allowed values and the names other trainers use for it.
    `from_bool` = (value for true, value for false), for fields other trainers write as booleans;
    `synonyms` = {other spelling: allowed value} (YAML reads `no` as false, kohya writes fp32 as no)."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "group": group, "path": path,
            "minimum": minimum, "from_bool": from_bool, "synonyms": synonyms or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


TARGET_PRESETS = ("kohya", "attention", "locon", "double", "single")  # double/single: Flux.1 only
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")  # engine/lora/variants/
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Adafactor", "Prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    # --- model ------------------------------------------------------------------------------------
    task_type: str = _f("image", "image, or text-generation: a LoRA for a local language model, run by the command "
                        "line (python -m engine train --help-config --set task_type=text-generation lists its "
                        "keys).", choices=("image", "text-generation"), group="model")
    base_model: str = _f("", "Local path of the checkpoint (.safetensors/.ckpt) or diffusers folder. "
                         "Not needed inside ComfyUI/A1111, which pass the loaded model.", group="model",
                         aliases=("pretrained_model_name_or_path", "model_path"), path="any")
    ae: str = _f("", "Flux.1: the autoencoder file (ae.safetensors), as kohya's --ae. Flux files hold the "
                 "transformer alone.", group="model", path="file")
    clip_l: str = _f("", "Flux.1: the CLIP-L text encoder file (clip_l.safetensors), as kohya's --clip_l.",
                     group="model", path="file")
    t5xxl: str = _f("", "Flux.1: the T5-XXL text encoder file (t5xxl_fp16.safetensors), as kohya's --t5xxl.",
                    group="model", path="file")
    t5xxl_tokenizer: str = _f("", "Flux.1: a folder with T5's tokenizer.json or spiece.model (default: beside "
                              "the t5xxl file, or the local Hugging Face cache of google/t5-v1_1-xxl).",
                              group="model", path="any")
    prediction_type: str = _f("auto", "epsilon or v_prediction; auto detects it (SD2-768 models are v).",
                              choices=("auto", "epsilon", "v_prediction"), group="model")
    clip_skip: int = _f(0, "Use the output of the N-th last text-encoder layer (0 = the family's default, "
                        "2 = penultimate as in anime models).", group="model", minimum=0)
    device: str = _f("auto", "auto, cpu, cuda, cuda:1, mps.", group="model")
    attention: str = _f("sdpa", "Attention kernel: sdpa (PyTorch) or xformers (when installed).",
                        choices=("sdpa", "xformers"), group="model")

    # --- data ---------------------------------------------------------------------------------------
    train_data_dir: str = _f("", "Folder of training images (kohya `N_name` subfolders allowed).",
                             group="data", aliases=("image_dir", "data_dir", "dataset_dir"), path="dir")
    metadata_path: str = _f("", "metadata.csv / metadata.jsonl with captions; default: found in "
                            "train_data_dir if present.", group="data", path="file")
    caption_extension: str = _f(".txt", "Sidecar caption extension (.caption is also read).", group="data",
                                aliases=("caption_extention",))
    reg_data_dir: str = _f("", "Optional regularisation (class) images.", group="data", path="dir")
    prior_loss_weight: float = _f(1.0, "Loss weight of regularisation images.", group="data", minimum=0)
    repeats: int = _f(1, "Repeats for images in a flat folder (kohya `N_name` folders set their own).",
                      group="data", aliases=("num_repeats",), minimum=1)
    trigger_word: str = _f("", "Put first in every caption (and kept in place when shuffling).",
                           group="data", aliases=("class_tokens", "trigger"))
    shuffle_caption: bool = _f(False, "Shuffle comma-separated tags each step.", group="data")
    keep_tokens: int = _f(0, "Leading tags kept in place when shuffling.", group="data", minimum=0)
    max_token_length: int = _f(75, "Caption tokens the text encoder sees: 75, or 150 / 225 (kohya's option: "
                               "the caption is encoded in 75-token windows and joined; for long tag lists). "
                               "In ComfyUI the windows are ComfyUI's own 77-token chunks; A1111 needs 75.",
                               group="data", choices=(75, 150, 225))
    t5xxl_max_token_length: int = _f(0, "Flux.1: T5-XXL tokens per caption (kohya's option); 0 = kohya's default, "
                                     "512 for dev and 256 for schnell. Longer captions are cut, shorter ones padded. "
                                     "In ComfyUI the loaded CLIP's tokenizer pads T5 to this length and longer "
                                     "captions are cut to it.", group="data", minimum=0)
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption.", group="data",
                                aliases=("caption_dropout_rate",), minimum=0)
    caption_tag_dropout_rate: float = _f(0.0, "Probability of dropping each comma-separated tag of a caption "
                                         "each step (tags within keep_tokens and the trigger word are kept). "
                                         "Turns text-encoder caching off.", group="data", minimum=0)
    caption_dropout_every_n_epochs: int = _f(0, "Train every N-th epoch on empty captions (0 = off).", group="data",
                                             minimum=0)
    masked_loss: bool = _f(False, "Weight the loss per pixel by each image's mask: <image>_mask.png beside it "
                           "(white trains, black is ignored), or its alpha channel with alpha_mask.", group="data")
    alpha_mask: bool = _f(False, "Use each image's alpha channel as its loss mask (turns masked_loss on).",
                          group="data")
    conditioning_data_dir: str = _f("", "Folder of masks named as the images (kohya's), for masked_loss.",
                                    group="data", path="dir")
    validation_data_dir: str = _f("", "Folder of validation images (with captions) for the validation loss.",
                                  group="data", path="dir")
    validation_split: float = _f(0.0, "Fraction of the training images held out for the validation loss "
                                 "(kohya's option); 0 = none.", group="data", minimum=0)
    validation_seed: int = _f(-1, "Seed of the held-out choice and of the validation noise (-1: seed).", group="data")
    validate_every_n_steps: int = _f(0, "Validation loss every N steps (0 = off).", group="data", minimum=0)
    validate_every_n_epochs: int = _f(1, "Validation loss every N epochs (0 = off); always at the end.", group="data",
                                      minimum=0)
    max_validation_steps: int = _f(0, "Validation batches per evaluation (0 = all).", group="data", minimum=0)
    resolution: str = _f("auto", "Training resolution: 512, '768,512' (W,H) or auto (the family's native).",
                         group="data")
    enable_bucket: bool = _f(True, "Aspect-ratio buckets (kohya-compatible resolutions).", group="data")
    min_bucket_reso: int = _f(256, "Smallest bucket side.", group="data", minimum=64)
    max_bucket_reso: int = _f(1024, "Largest bucket side (raised to 2048 for SDXL).", group="data", minimum=64)
    bucket_reso_steps: int = _f(64, "Bucket sides are multiples of this.", group="data", minimum=8)
    bucket_no_upscale: bool = _f(False, "Never upscale small images into a bucket.", group="data")
    flip_aug: bool = _f(False, "Random horizontal flips.", group="data")
    random_crop: bool = _f(False, "Random instead of centre crops (disables latent caching).", group="data")
    color_jitter: float = _f(0.0, "Strength of random colour jitter, 0-1 (disables latent caching).",
                             group="data", aliases=("color_aug",), minimum=0, from_bool=(0.1, 0.0))
    cache_latents: str = _f("auto", "auto (memory when valid), memory, disk, off (true/false as kohya "
                            "writes them mean memory/off). Disk latents are keyed on the image's content "
                            "and the VAE's weights: a later run with the same VAE reuses them, an edited "
                            "image or another VAE is encoded again.",
                            choices=("auto", "memory", "disk", "off"), group="data", from_bool=("memory", "off"))
    cache_text_encoder_outputs: str = _f("auto", "auto (when the text encoder is frozen and captions "
                                         "are fixed), on, off.", choices=("auto", "on", "off"), group="data",
                                         from_bool=("on", "off"))
    cache_dir: str = _f("", "Where disk caches go; default: a .lora_cache folder in train_data_dir (or in "
                        "output_dir when that folder is read-only).", group="data", path=None)
    no_half_vae: bool = _f(False, "Encode the latents made during training (cache_latents off, random_crop, "
                           "color_jitter) in the VAE's own precision. By default they are encoded under bf16 "
                           "autocast when training in bf16 (faster; bf16 has fp32's range, so no fp16 "
                           "overflow). Cached latents always use the VAE's own precision.", group="data")
    vae_batch_size: int = _f(4, "Images per VAE call while caching latents.", group="data", minimum=1)
    min_image_size: int = _f(64, "Images with a side below this are skipped with a warning.", group="data",
                             minimum=1)

    # --- LoRA network ---------------------------------------------------------------------------------
    lora_rank: int = _f(16, "LoRA rank (dim).", group="network", aliases=("network_dim", "rank"), minimum=1)
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means rank/2. Scale = alpha/rank.", group="network",
                           aliases=("network_alpha", "alpha"), minimum=0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA down projection.", group="network",
                             aliases=("network_dropout",), minimum=0)
    target_modules: Any = _f("kohya", "kohya (attention + feed-forward + proj in transformer blocks), "
                             "attention, locon (+ ResNet convs), or a list of name suffixes. Flux.1: kohya (every "
                             "block Linear), double, single, attention.",
                             group="network")
    conv_rank: int = _f(0, "Rank for 3x3 convs with locon; 0 = lora_rank.", group="network",
                        aliases=("conv_dim",), minimum=0)
    conv_alpha: float = _f(0.0, "Alpha for 3x3 convs with locon; 0 = conv_rank/2.", group="network", minimum=0)
    down_lr_weight: Any = _f("", "UNet lr multipliers of the down blocks (SD: 12, SDXL: 9), comma-separated, or a "
                             "preset: cosine, sine, linear, reverse_linear, zeros (+base, e.g. sine+.5). kohya's "
                             "network_args; a block at 0 gets no LoRA.", group="network")
    mid_lr_weight: Any = _f("", "UNet lr multipliers of the mid block(s) (SD: 1, SDXL: 3), comma-separated.",
                            group="network")
    up_lr_weight: Any = _f("", "UNet lr multipliers of the up blocks (deep to shallow), as down_lr_weight.",
                           group="network")
    block_lr_zero_threshold: float = _f(0.0, "Block lr multipliers at or below this count as 0.", group="network",
                                        minimum=0)
    block_dims: Any = _f("", "Rank of every UNet block, comma-separated (SD: 25 values, SDXL: 23); 0 = no LoRA "
                         "there.", group="network")
    block_alphas: Any = _f("", "Alpha of every UNet block, as block_dims (default: lora_alpha).", group="network")
    conv_block_dims: Any = _f("", "Rank of the 3x3 convs of every block (LoCon), as block_dims.", group="network")
    conv_block_alphas: Any = _f("", "Alpha of the 3x3 convs of every block, as block_dims.", group="network")
    network_type: str = _f("lora", "The module each targeted layer gets: lora; locon (LoRA with target_modules "
                           "locon); or LyCORIS' loha (Hadamard product), lokr (Kronecker product) or dora (LoRA "
                           "with a learned magnitude per input channel). Files load in ComfyUI's LoraLoader, "
                           "A1111/Forge and LyCORIS.", choices=NETWORK_TYPES, group="network", aliases=("algo",))
    lokr_factor: int = _f(-1, "LoKr: split each side of a layer as (factor, size/factor); -1 takes the split "
                          "closest to a square (LyCORIS' factor).", group="network", aliases=("factor",))
    decompose_both: bool = _f(False, "LoKr: make the smaller Kronecker factor low-rank too (LyCORIS' "
                              "decompose_both).", group="network")
    full_matrix: bool = _f(False, "LoKr: keep both Kronecker factors full whatever the rank (LyCORIS' "
                           "full_matrix).", group="network")
    use_tucker: bool = _f(False, "LyCORIS' Tucker (CP) form of 3x3 kernels: not supported, stays false.",
                          group="network", aliases=("use_cp",))
    network_weights: str = _f("", "Continue from an existing LoRA file (kohya, diffusers/PEFT or "
                              "ComfyUI-native).", group="network", aliases=("init_lora",), path="file")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).", group="network")
    text_encoder_lr: float = _f(5e-5, "Learning rate of the text-encoder LoRA.", group="network", minimum=0)

    # --- optimisation ---------------------------------------------------------------------------------
    batch_size: int = _f(1, "Images per step.", aliases=("train_batch_size",), minimum=1)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients are summed per update.", minimum=1)
    epochs: int = _f(10, "Passes over the dataset (repeats included).",
                     aliases=("max_train_epochs", "num_train_epochs", "num_epochs"), minimum=1)
    max_train_steps: int = _f(0, "Optimizer updates; when > 0 it overrides epochs.", minimum=0)
    learning_rate: float = _f(1e-4, "UNet LoRA learning rate.", aliases=("unet_lr", "lr"), minimum=0)
    lr_scheduler: str = _f("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_steps: float = _f(0.05, "Warm-up: a step count, or a ratio of the run when below 1.",
                             aliases=("lr_warmup_steps", "warmup_ratio"), minimum=0)
    lr_scheduler_num_cycles: int = _f(1, "Restarts for cosine_with_restarts.", minimum=1,
                                      aliases=("lr_restart_cycles",))
    lr_scheduler_power: float = _f(1.0, "Power for the polynomial schedule.", minimum=0)
    optimizer: str = _f("AdamW", "AdamW, AdamW8bit (bitsandbytes, CUDA), Lion, Adafactor, Prodigy.",
                        choices=OPTIMIZERS, aliases=("optimizer_type",))
    optimizer_args: dict = _f({}, "Extra optimizer keyword arguments, e.g. {betas: [0.9, 0.99]}.")
    weight_decay: float = _f(0.01, "Decoupled weight decay.", minimum=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns it off.", minimum=0)
    nan_guard_steps: int = _f(3, "NaN guard: an update whose loss or gradients are NaN/inf is skipped; after this "
                              "many in a row the run restores the last good LoRA state and switches fp16 to bf16 "
                              "(where the GPU has bf16) or halves the learning rate, and goes on. 0: the first "
                              "NaN loss stops the run.", minimum=0)
    mixed_precision: str = _f("auto", "auto (bf16 where the GPU supports it, else fp16; fp32 on CPU), "
                              "no (fp32), fp16, bf16.", choices=("auto", "no", "fp16", "bf16"),
                              synonyms={False: "no", "fp32": "no", "float32": "no", "float16": "fp16",
                                        "bfloat16": "bf16"})
    autocast: str = _f("auto", "auto: with bf16, a model whose frozen weights already are bf16 runs natively "
                       "in bf16 (autocast would only add casts and float32 copies of activations; SD1.5 on "
                       "an H100: 10-21% less peak memory, 5-27% faster); the loss stays float32. always: "
                       "autocast every forward, as diffusers' and kohya's scripts do.", choices=("auto", "always"))
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: about 35% "
                                      "slower, far less memory. Turn on for SDXL on cards under 16 GB.")
    cpu_offload_checkpointing: bool = _f(False, "With gradient_checkpointing on Flux.1: keep each block's "
                                         "input in pinned CPU memory between the forward and the backward "
                                         "instead of on the GPU (copied asynchronously; gradients unchanged). "
                                         "At 1024 px that is 1.45 GiB less per image in the batch "
                                         "(bench.flux_step_memory), for a few percent of step time. kohya's "
                                         "--cpu_offload_checkpointing; no effect on other models or without "
                                         "checkpointing; where it acts, the step runs without CUDA graphs.")
    fp8_base: bool = _f(False, "Store the frozen UNet's Linear and Conv2d weights in float8 (e4m3fn): on an "
                        "H100 at batch 1 with gradient_checkpointing, SD1.5 1.12 instead of 1.93 GiB, SDXL "
                        "3.61 instead of 6.05 GiB, Flux.1-dev 14.3 instead of 25.4 GiB (10% slower there). "
                        "Each layer casts its weight to bf16/fp16 as it runs and backward keeps only the "
                        "fp8 weight, so it saves the weight bytes with checkpointing off too; LoRA and "
                        "optimizer stay float32 "
                        "(kohya's --fp8_base). Only for a base_model the engine loads itself (the command "
                        "line): a host's model is never converted (in ComfyUI, a UNet loaded in fp8 by Load Diffusion Model trains as it "
                        "is). Needs mixed_precision bf16 or fp16.", aliases=("fp8_base_unet",))
    fp8_compute: bool = _f(False, "Run the frozen UNet's large Linear layers (attention, feed-forward, projections) on fp8 "
                           "tensor cores, forward and input gradient, with row-wise scales; LoRA, convolutions and "
                           "attention stay bf16. Needs a GPU with fp8 tensor cores (compute capability 8.9+: RTX 40xx, "
                           "L40S, H100) and mixed_precision bf16. Uses the weights' own fp8 storage where they have "
                           "one (fp8_base, ComfyUI's fp8_e4m3fn); otherwise holds an fp8 copy for the run (1 byte "
                           "per weight: SD1.5 0.25 GiB, SDXL 2.1 GiB, Flux 11 GiB). On an H100 it did not speed up SDXL or "
                           "Flux (bench/README.md: quantising and transposing take back what the fp8 GEMMs save).")
    cuda_graph: bool = _f(True, "Replay each training step as one CUDA graph (CUDA, bf16/fp32, AdamW, no "
                          "gradient accumulation; otherwise the plain step runs). Removes the per-step "
                          "Python and launch overhead: 2-8x faster on an H100 (bench/RESULTS.md), for "
                          "0.1-0.4 GiB more memory (SD1.5). The first step of each bucket shape runs "
                          "eagerly, the second captures.")
    torch_compile: bool = _f(False, "Compile the training step with torch.compile (inductor), inside the CUDA "
                             "graph: fuses its elementwise kernels (bench/RESULTS.md has the speed-up). Each "
                             "bucket shape compiles at its first step, a few minutes (SDXL: about six on an H100, "
                             "for 1.15x at batch 8), so it pays off on long runs. Flux.1 compiles its double and "
                             "single blocks instead, each kind once per bucket shape. CUDA only (needs Triton); "
                             "elsewhere, or for a model it cannot compile, the run trains without it (logged).")
    seed: int = _f(42, "Random seed (data order, noise, timesteps).", minimum=0)
    ddp_timeout: int = _f(0, "Several GPUs: minutes a process waits for the others in a gradient exchange before "
                          "it gives up (0: 30). A process that dies ends the others at once; this bounds a hung one.",
                          minimum=0)
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", minimum=0)
    min_snr_gamma: float = _f(5.0, "Min-SNR loss weighting gamma; 0 turns it off.", minimum=0)
    multires_noise_iterations: int = _f(0, "Multi-resolution (pyramid) noise levels, 6-10 suggested; 0 = off "
                                        "(kohya's option; SD1/SD2/SDXL).", minimum=0)
    multires_noise_discount: float = _f(0.3, "Weight ratio between pyramid-noise levels (kohya's default 0.3).",
                                        minimum=0)
    ip_noise_gamma: float = _f(0.0, "Input-perturbation noise strength, about 0.1 (arXiv 2301.11706); 0 = off "
                               "(SD1/SD2/SDXL).", minimum=0)
    ip_noise_gamma_random_strength: bool = _f(False, "Draw the input-perturbation strength from [0, "
                                              "ip_noise_gamma) each step.")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the LoRA weights with this decay per step, "
                          "e.g. 0.999 (about the last 1000 steps); 0 = off.", minimum=0)
    ema_start_step: int = _f(0, "The average copies the weights up to this step and averages after it.", minimum=0)
    ema_save: str = _f("beside", "beside: <name>.safetensors holds the trained weights and <name>_ema.safetensors "
                       "the average; instead: <name>.safetensors holds the average.", choices=("beside", "instead"))
    # flow-matching models (Flux.1): kohya's flux_train_network.py options, by their names
    timestep_sampling: str = _f("auto", "How sigma is drawn for flow models (Flux.1): auto (the model's own: Flux.1 "
                                "flux_shift), sigma (from the shifted schedule, kohya's default), uniform, sigmoid, "
                                "shift (sigmoid shifted by discrete_flow_shift), flux_shift (sigmoid shifted by "
                                "Flux's resolution-dependent mu), logit_normal. SD models ignore it.",
                                choices=("auto", "sigma", "uniform", "sigmoid", "shift", "flux_shift", "logit_normal"))
    sigmoid_scale: float = _f(1.0, "Scale of the normal draw in sigmoid / shift / flux_shift sampling.", minimum=0)
    discrete_flow_shift: float = _f(3.0, "Shift of the shift and sigma samplings (kohya's guide: 3.1582 for Flux.1).",
                                    minimum=0)
    weighting_scheme: str = _f("none", "Flow loss weighting (SD3 paper): none, sigma_sqrt, cosmap; logit_normal and "
                               "mode shape the sigma sampling instead.",
                               choices=("none", "sigma_sqrt", "logit_normal", "mode", "cosmap"),
                               synonyms={"uniform": "none"})
    logit_mean: float = _f(0.0, "Mean of the logit_normal sigma density.")
    logit_std: float = _f(1.0, "Standard deviation of the logit_normal sigma density.", minimum=0)
    mode_scale: float = _f(1.29, "Scale of the mode sigma density.")
    guidance_scale: float = _f(1.0, "Guidance value fed to Flux.1 dev's guidance input while training (kohya's "
                               "--guidance_scale; 1.0 as kohya's guide recommends). Schnell has no guidance input.",
                               minimum=0)

    # --- output -------------------------------------------------------------------------------------
    output_dir: str = _f("output", "Where `<output_name>/` is written.", group="save")
    output_name: str = _f("my_lora", "File name of the LoRA (without .safetensors).", group="save")
    save_precision: str = _f("fp16", "Dtype of the saved LoRA.", choices=("fp16", "bf16", "fp32"),
                             group="save")
    save_steps: int = _f(0, "Write a checkpoint every N steps (0 = off).", group="save",
                         aliases=("save_every_n_steps", "checkpointing_steps"), minimum=0)
    save_every_n_epochs: int = _f(1, "Write a checkpoint every N epochs (0 = off).", group="save", minimum=0)
    save_last_n_checkpoints: int = _f(3, "Older checkpoints are deleted (0 keeps all).", group="save",
                                      minimum=0)
    resume_from_checkpoint: str = _f("", "'latest' or a checkpoint folder to continue from exactly.",
                                     group="save", aliases=("resume",))
    log_with: str = _f("", "tensorboard to log scalars and previews.", choices=("", "tensorboard"),
                       group="save")
    logging_dir: str = _f("", "Folder for TensorBoard logs; default <output_dir>/<output_name>/logs. Setting it "
                          "turns log_with tensorboard on, as in kohya.", group="save")
    log_prefix: str = _f("", "TensorBoard logs go to <logging_dir>/<log_prefix><date-time> when logging_dir is "
                         "set (kohya's layout).", group="save")
    overwrite: bool = _f(False, "Command line: replace the LoRA of an earlier run with the same output_name. "
                         "Off: a new run is written as <output_name>_2, _3, ... instead (a resumed run keeps its "
                         "name), as Save LoRA and the A1111 tab do.", group="save")
    training_comment: str = _f("", "Stored in the file's metadata (ss_training_comment).", group="save")

    # --- previews -----------------------------------------------------------------------------------
    sample_prompts: Any = _f([], "Preview prompts: a list, or a .txt file with one prompt per line "
                             "(kohya's --n/--w/--h/--d/--l/--s options allowed).", group="sample")
    sample_every_n_steps: int = _f(0, "Preview every N steps (0 = off).", group="sample", minimum=0)
    sample_every_n_epochs: int = _f(0, "Preview every N epochs (0 = off).", group="sample", minimum=0)
    sample_steps: int = _f(20, "Sampling steps for previews.", group="sample", minimum=1)
    sample_cfg: float = _f(7.0, "CFG scale for SD previews (Flux.1 previews sample with CFG 1, as kohya's).",
                           group="sample", minimum=0)
    sample_guidance: float = _f(3.5, "Flux.1 dev previews: the value of the model's guidance input (FluxGuidance's "
                                "3.5; kohya's --g in a prompt line). Schnell has no guidance input.", group="sample",
                                minimum=0)
    sample_seed: int = _f(1234, "Seed for previews, the same every time so they compare.", group="sample")

    # ------------------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else self.lora_rank / 2

    @property
    def conv_dim(self) -> int:
        return self.conv_rank or self.lora_rank

    @property
    def conv_alpha_value(self) -> float:
        return self.conv_alpha if self.conv_alpha > 0 else self.conv_dim / 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a (possibly grouped, possibly aliased, possibly kohya-sectioned) mapping, validating
        every key and value (engine/config_io.py)."""
        from .config_io import config_from_mapping

        return config_from_mapping(data, source)

    def replace(self, **changes: Any) -> "TrainConfig":
        data = self.to_dict()
        data.update(changes)
        return TrainConfig.from_dict(data)

    def with_overrides(self, assignments: list[str]) -> "TrainConfig":
        """Apply `--set key=value` overrides (values parsed as YAML: 1e-4, true, [a, b])."""
        from .config_io import apply_overrides

        return apply_overrides(self, assignments)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self, source: str = "config") -> None:
        """Cross-field checks; per-field types and ranges were checked while coercing (engine/config_checks.py)."""
        from .config_checks import validate_config

        validate_config(self, source)

    def resolution_wh(self, native: int = 512) -> tuple[int, int]:
        """(width, height) of the training resolution; `auto` is the family's native size."""
        raw = str(self.resolution).strip().lower().replace("x", ",")
        if raw in ("auto", "", "0"):
            return native, native
        try:
            parts = [int(p) for p in raw.split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 64:
            raise ConfigError(f"resolution must be a size like 512, '768,512' (width,height) or auto; "
                              f"got {self.resolution!r}.")
        return parts[0], parts[1]

    def check_paths(self, *, need_base_model: bool) -> None:
        """Say which key points at a path that does not exist (engine/config_checks.py)."""
        from .config_checks import check_paths

        check_paths(self, need_base_model=need_base_model)


_FIELD_META = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}


def field_meta(name: str) -> dict:
    """A field's metadata (help, group, choices, aliases, path kind...)."""
    return _FIELD_META[name]
