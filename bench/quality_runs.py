"""The trainers bench/quality.py compares, each given the same recipe on the demo model.

Same data and captions (the demo's striped shapes, 64 px, no buckets, no flips, no caption tricks),
the same layers (kohya's default: every Linear and 1x1 conv in the transformer blocks, UNet only),
rank, alpha, AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01), gradient clipping at 1.0, learning
rate, constant schedule, steps, batch and seed; v-prediction on the demo's zero-terminal-SNR schedule,
plain MSE (no min-SNR), float32. Each run writes its LoRA every `every` steps.

- ours: `engine.train` as the command line runs it.
- diffusers: the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py (PEFT
  `LoraConfig(init_lora_weights="gaussian")` added with `unet.add_adapter`, the VAE sampled and the
  text encoder run every step, `noise_scheduler.get_velocity` as the target, `F.mse_loss`), written
  here for the demo model; LoRA only (the examples have no LoHa/LoKr/DoRA).
- kohya / lycoris: kohya sd-scripts' train_network.py (networks.lora; lycoris.kohya for LoHa, LoKr
  and DoRA) in its own process, bench/quality_kohya.py. Given the same initial weights, batches and
  draws, kohya's step and ours end at the same weights (tests/engine/test_quality_kohya_step.py, through
  bench/quality_kohya_step.py); the runs still differ in their random draws, which each tool makes its own way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass(frozen=True)
class Recipe:
    steps: int = 300
    every: int = 25
    batch: int = 4
    lr: float = 2e-3
    rank: int = 16
    alpha: float = 16.0
    seed: int = 0
    images: int = 12
    precision: str = "no"  # or bf16 (on a GPU: ours' CUDA-graphed step, kohya's and the loop's autocast)
    samples: int = 1  # pictures per prompt for the concept check (scoring only; the same for every tool)


def ours_config(root: Path, recipe: Recipe, network_type: str, out: Path):
    """The TrainConfig `ours` trains with: the recipe, with kohya's settings wherever ours' defaults differ
    (constant schedule without warm-up, no min-SNR, alpha as given, UNet only; README's Defaults)."""
    from engine.config import TrainConfig

    return TrainConfig(train_data_dir=str(root / "train"), output_dir=str(out), output_name="ours", resolution="64",
                       enable_bucket=False, batch_size=recipe.batch, max_train_steps=recipe.steps,
                       learning_rate=recipe.lr, lr_scheduler="constant", warmup_steps=0, min_snr_gamma=0,
                       lora_rank=recipe.rank, lora_alpha=recipe.alpha, network_type=network_type,
                       target_modules="kohya", train_text_encoder=False, seed=recipe.seed, save_steps=recipe.every,
                       save_every_n_epochs=0, save_last_n_checkpoints=1, save_precision="fp32", optimizer="AdamW",
                       weight_decay=0.01, max_grad_norm=1.0, mixed_precision=recipe.precision)


def ours(root: Path, recipe: Recipe, network_type: str, out: Path) -> dict[int, Path]:
    from engine.models.demo_model import demo_model
    from engine.train import train

    result = train(ours_config(root, recipe, network_type, out), demo_model(device=_device()))
    files = {s: out / "ours" / f"ours-step{s:08d}.safetensors" for s in range(recipe.every, recipe.steps, recipe.every)}
    files[recipe.steps] = result.lora_path
    return files


def diffusers_loop(root: Path, recipe: Recipe, out: Path) -> dict[int, Path]:
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from engine.models.demo_model import demo_model
    from .quality_eval import Holdout

    torch.manual_seed(recipe.seed)
    dev = _device()
    model = demo_model(device=dev)
    unet, vae = model.unet, model.vae
    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config)
    data = Holdout(model, root / "train")  # pictures and captions; the loop re-encodes the pixels each step
    pixels = _pixels(root / "train").to(dev)
    autocast = torch.autocast(dev.type, torch.bfloat16, enabled=recipe.precision == "bf16")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    step, g = 0, torch.Generator().manual_seed(recipe.seed)
    unet.train()
    while step < recipe.steps:
        for idx in torch.randperm(data.count, generator=g).split(recipe.batch):
            with torch.no_grad():
                latents = vae.encode(pixels[idx.to(dev)]).latent_dist.sample() * vae.config.scaling_factor
                context = data.cond["context"][idx.to(dev)]
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=dev).long()
            noisy = noise_scheduler.add_noise(latents, noise, t)
            tgt = noise_scheduler.get_velocity(latents, noise, t)
            with autocast:  # the scripts' Accelerator(mixed_precision="bf16"); LoRA weights stay float32
                pred = unet(noisy, t, context, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), tgt.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % recipe.every == 0 or step == recipe.steps:
                sd = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}
                for key in [k for k in sd if k.endswith(".lora_A.weight")]:
                    sd[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(recipe.alpha)
                files[step] = out / f"diffusers-step{step:08d}.safetensors"
                save_file(sd, str(files[step]))
            if step == recipe.steps:
                break
    return files


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pixels(folder: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                        / 127.5 - 1 for f in sorted(folder.glob("*.png"))])


# --- kohya sd-scripts (and LyCORIS through it), in their own process -------------------------------------
LYCORIS_ARGS = {"lora": [], "loha": ["algo=loha"], "lokr": ["algo=lokr", "factor=-1"],
                "dora": ["algo=lora", "dora_wd=True", "wd_on_output=False"]}


def kohya_available() -> str | None:
    """Why kohya cannot run here, or None."""
    kdir = os.environ.get("KOHYA_DIR")
    if not kdir or not (Path(kdir) / "train_network.py").is_file():
        return "KOHYA_DIR is not set to a kohya-ss/sd-scripts checkout"
    return None


def lycoris_available() -> str | None:
    why = kohya_available()
    if why:
        return why
    ldir = os.environ.get("LYCORIS_DIR")
    if ldir and (Path(ldir) / "lycoris" / "kohya.py").is_file():
        return None
    python = os.environ.get("KOHYA_PYTHON", sys.executable)
    found = subprocess.run([python, "-c", "import lycoris.kohya"], capture_output=True).returncode == 0
    return None if found else "LyCORIS is neither installed for KOHYA_PYTHON nor in LYCORIS_DIR"


def kohya_args(root: Path, recipe: Recipe, network_type: str, out: Path) -> list[str]:
    """train_network.py's command line for the recipe (the demo pipeline folder made once in `root`)."""
    pipe = _pipeline_folder(root)
    data = root / "kohya_data"
    if not data.exists():
        shutil.copytree(root / "train", data / "1_stripes")
    preset = root / "lycoris_kohya_layers.toml"
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                      'text_encoder_target_module = []\ntext_encoder_target_name = []\n', encoding="utf-8")
    args = ["--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "kohya", "--resolution", "64", "--train_batch_size", str(recipe.batch),
            "--max_train_steps", str(recipe.steps), "--network_dim", str(recipe.rank),
            "--network_alpha", str(recipe.alpha), "--mixed_precision", recipe.precision, "--save_precision", "float",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", str(recipe.lr),
            "--lr_scheduler", "constant", "--seed", str(recipe.seed), "--tokenizer_cache_dir", str(root / "tokenizers"),
            "--caption_extension", ".txt", "--save_every_n_steps", str(recipe.every), "--cache_latents",
            "--max_data_loader_n_workers", "0", "--v_parameterization", "--zero_terminal_snr",
            "--save_model_as", "safetensors", "--max_grad_norm", "1.0"]
    if network_type == "lora":
        return args + ["--network_module", "networks.lora"]
    return args + ["--network_module", "lycoris.kohya", "--network_args", *LYCORIS_ARGS[network_type],
                   f"preset={preset}"]


def kohya_env() -> dict[str, str]:
    """kohya's environment: KOHYA_DIR, LYCORIS_DIR and KOHYA_EXTRA_PATH on its PYTHONPATH."""
    env = dict(os.environ)
    paths = [os.environ["KOHYA_DIR"], os.environ.get("LYCORIS_DIR", ""), os.environ.get("KOHYA_EXTRA_PATH", ""),
             env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def kohya(root: Path, recipe: Recipe, network_type: str, out: Path) -> dict[int, Path]:
    """kohya's train_network.py on the demo model (a diffusers folder made once in `root`)."""
    args = kohya_args(root, recipe, network_type, out)
    python = os.environ.get("KOHYA_PYTHON", sys.executable)
    run = subprocess.run([python, str(Path(__file__).with_name("quality_kohya.py")), *args], env=kohya_env(),
                         capture_output=True, text=True, cwd=os.environ["KOHYA_DIR"])
    (out / "kohya.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "kohya.log").write_text(run.stdout + run.stderr, encoding="utf-8")
    if run.returncode != 0:
        raise RuntimeError(f"kohya failed ({out / 'kohya.log'}): {run.stderr[-2000:]}")
    files = {s: out / f"kohya-step{s:08d}.safetensors" for s in range(recipe.every, recipe.steps, recipe.every)}
    files[recipe.steps] = out / "kohya.safetensors"
    return files


def _pipeline_folder(root: Path) -> Path:
    """The demo model as a diffusers folder kohya can load, and the CLIP tokenizer where kohya looks."""
    from diffusers import StableDiffusionPipeline

    from engine.models.clip_tokenizer import _files_for_old_transformers
    from engine.models.demo_model import demo_model

    folder = root / "demo_pipeline"
    if (folder / "model_index.json").exists():
        return folder
    model = demo_model()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=model.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    tokenizer = root / "tokenizers" / "openai_clip-vit-large-patch14"
    model.tokenizers[0].save_pretrained(str(tokenizer))
    for name in _files_for_old_transformers():  # kohya's transformers 4.x reads vocab.json + merges.txt
        shutil.copy(name, tokenizer / Path(name).name)
    return folder


def recipe_dict(recipe: Recipe) -> dict:
    return asdict(recipe)
