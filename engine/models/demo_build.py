"""Build the demo model from nothing: `python -m engine.models.demo_build --out engine/assets/demo/demo_model.safetensors`.

Everything is our own code and runs on a CPU in about 25 minutes (seeded: a rebuild with the same
thread count on the same torch build gives the same model; the file records how it was built).
Two stages, as Stable Diffusion itself was made:

1. the VAE learns to reconstruct procedural pictures: palette shapes, but also shapes of any colour,
   size and place, half of them striped, so that it can encode what the UNet never sees (a LoRA can
   only teach a concept the VAE can represent);
2. the UNet and text encoder learn v-prediction on SD's DDPM schedule rescaled to zero terminal SNR
   (as SD2-v models with ztsnr: with eps and SD1's schedule a model this small cannot choose a
   picture's overall brightness, so "on a black background" came out pink), on palette shapes
   only, captioned "a red circle" / "a red circle on a white background" (10% empty captions for
   classifier-free guidance). An EMA of the weights is what gets saved.

The file stores fp16 weights under `unet.`, `vae.`, `text_encoder.` and the measured latent scaling
factor in its metadata; `demo_model.demo_model()` loads it. `--preview` writes sample pictures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .demo_shapes import caption, draw, random_scene, wild_scene

CHECK_PROMPTS = ["a red circle on a white background", "a blue square on a black background",
                 "a yellow triangle on a gray background", "a green circle", "a purple square"]


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def warmup_cosine(opt, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def vae_pool(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Pictures for the VAE (uint8): three quarters palette scenes, 40% of those striped in a random
    second colour; a quarter anything (`wild_scene`)."""
    images = []
    for _ in range(n):
        if rng.random() < 0.75:
            scene = random_scene(rng, jitter=10.0)[0]
            if rng.random() < 0.4:
                scene.stripes = (tuple(int(v) for v in rng.integers(0, 256, 3)), float(rng.uniform(0, 180)),
                                 float(rng.uniform(8, 16)))
        else:
            scene = wild_scene(rng)
        images.append(draw(scene))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, steps: int, rng: np.random.Generator, batch: int, lr: float, log, pool_size: int = 3000,
              crop: int = 32) -> None:
    """Reconstruction (MSE + L1) plus a small KL term, on random 32 px crops: the VAE is convolutional,
    and crops cost a quarter of full pictures, so it sees four times as many edges in the same time."""
    pool = vae_pool(rng, pool_size)
    log(f"vae: drew {pool_size} pictures")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warmup=50)
    vae.train()
    avg = None
    for step in range(steps):
        i, j = (int(v) for v in rng.integers(0, pool.shape[-1] - crop + 1, 2))
        x = pool[rng.integers(pool_size, size=batch), :, i:i + crop, j:j + crop].float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = rec.item() if avg is None else 0.98 * avg + 0.02 * rec.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae {step:5d}/{steps} recon {avg:.4f} kl {kl.item():.2f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    latents, names = [], []
    for start in range(0, n, 64):
        scenes = [random_scene(rng) for _ in range(min(64, n - start))]
        names += [s[1:] for s in scenes]
        latents.append(vae.encode(_pixels([draw(s[0]) for s in scenes])).latent_dist.mean)
    return torch.cat(latents), names


def pick_caption(rng: np.random.Generator, shape: str, colour: str, background: str) -> str:
    r = rng.random()
    if r < 0.1:
        return ""
    return caption(shape, colour, background if r < 0.6 else None)


def train_unet(unet, te, tok, latents, names, steps: int, rng: np.random.Generator, batch: int, lr: float, log):
    from diffusers import DDPMScheduler

    from ..objectives import DDPMObjective
    from .clip_tokenizer import EOS_ID, tokenize
    from .diffusers_adapter import SCHEDULE

    sched = DDPMScheduler(**SCHEDULE, prediction_type="v_prediction", clip_sample=False, rescale_betas_zero_snr=True)
    objective = DDPMObjective(sched.alphas_cumprod.float(), "v_prediction")
    params = list(unet.parameters()) + list(te.parameters())
    for m in (unet, te):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_sched = warmup_cosine(opt, steps, warmup=100)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)]
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    avg = None
    for step in range(steps):
        idx = rng.integers(len(latents), size=batch)
        z0 = latents[idx]
        ids = tokenize(tok, [pick_caption(rng, *names[i]) for i in idx], EOS_ID)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        zt = objective.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=te(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, objective.target(z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, shadow in zip((unet, te), ema):
                for p, q in zip(live.parameters(), shadow.parameters()):
                    q.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet {step:5d}/{steps} loss {avg:.4f}")
    for live, shadow in zip((unet, te), ema):
        live.load_state_dict(shadow.state_dict())
        live.eval().requires_grad_(False)


def save(out: Path, unet, vae, te, scaling: float, build: dict) -> None:
    from safetensors.torch import save_file

    from .demo_model import PREFIXES
    from .load import te_keys_for

    tensors = {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        sd = module.state_dict()
        if name == "text_encoder":
            sd = te_keys_for(te, sd, wrapped=True)  # the HF layout every transformers version reads
        tensors.update({PREFIXES[name] + k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "inplace-lora-demo-model", "vae_scaling_factor": f"{scaling:.6f}",
                                           "image_size": "64", "prediction_type": "v_prediction",
                                           "zero_terminal_snr": "true", "build": json.dumps(build)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.demo_build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--images", type=int, default=4096, help="palette pictures the UNet trains on")
    parser.add_argument("--preview", default="", help="folder for sample pictures of the built model")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (default 2, as the shipped file was built; the thread count changes "
                             "the float sums, so keep it to rebuild the same file)")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--vae-from", default="", help="reuse the VAE of an earlier build (for UNet experiments)")
    args = parser.parse_args(argv)

    from .clip_tokenizer import clip_tokenizer
    from .configs import build_components
    from .demo_model import demo_configs, demo_model

    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    unet, vae, (te,) = build_components(demo_configs())
    if args.vae_from:
        vae = demo_model(args.vae_from).vae
        vae.requires_grad_(False)
        log(f"VAE taken from {args.vae_from}")
    else:
        train_vae(vae, args.vae_steps, rng, batch=args.vae_batch, lr=2e-3, log=log)
    latents, names = encode_dataset(vae, rng, args.images)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log(f"encoded {len(latents)} pictures; latent mean {latents.mean():.3f}, scaling factor {scaling:.4f}")
    train_unet(unet, te, clip_tokenizer(), latents * scaling, names, args.unet_steps, rng, batch=args.unet_batch, lr=1e-3,
               log=log)
    build = dict(builder="engine.models.demo_build", seed=args.seed, threads=args.threads,
                 vae_steps=args.vae_steps, unet_steps=args.unet_steps, images=args.images, seconds=round(time.time() - started))
    out = Path(args.out)
    save(out, unet, vae, te, scaling, build)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.preview:
        write_preview(out, Path(args.preview))
        log(f"previews in {args.preview}")
    return 0


def write_preview(model_file: Path, folder: Path) -> None:
    """The check prompts at two seeds, plus reconstructions, scaled up 3x."""
    from PIL import Image

    from .demo_model import demo_model

    folder.mkdir(parents=True, exist_ok=True)
    model = demo_model(model_file)
    rows = [model.sample(CHECK_PROMPTS, seed=s, steps=20, cfg=5.0, width=64, height=64) for s in (1, 2)]
    rng = np.random.default_rng(123)
    scenes = [random_scene(rng)[0] for _ in CHECK_PROMPTS]
    for scene in scenes[::2]:
        scene.stripes = ((20, 20, 20), 90.0, 12.0)
    originals = [draw(scene) for scene in scenes]
    recon = model.decode_latents(model.encode_images(_pixels(originals)))
    rows += [[Image.fromarray(a) for a in originals], recon]
    sheet = Image.new("RGB", (64 * len(CHECK_PROMPTS), 64 * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (64 * c, 64 * r))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(folder / "preview.png")


if __name__ == "__main__":
    raise SystemExit(main())
