"""`ForgeModel`: the checkpoint Forge (or Forge Neo, reForge, Forge Classic) has loaded, driven through
the engine's seam, the way `nodes.comfy_adapter` drives ComfyUI's: nothing is copied or reloaded.

The UNet is `forge_objects.unet.model.diffusion_model` with LDM names and ComfyUI's call signature
`(x, timesteps, context=, y=)`; `predict` calls it with the DDPM-form input and integer timesteps,
the schedule comes from the fork's sigmas (`alphas_cumprod = 1/(1+sigma^2)`). The text encoders are
the `clip_l`/`clip_h`/`clip_g` holders of `forge_objects.clip`; captions go through the WebUI's own
text path (Forge: its text-processing engines; reForge/Classic: A1111's conditioning), with emphasis
off, so they are encoded as prompts are. Latents come from the fork's VAE object.

Forge loads weights under `torch.inference_mode()`: `session()` borrows them as normal tensors
(`hostkit.borrowed_weights`) and gives back bit-identical inference tensors. Forge's own Linear is an
`nn.Module` that is not an `nn.Linear`, so for the session each one is *viewed* as an nn.Linear
(`linear_views`) and the engine's LoRA hooks attach to it as to any Linear.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from engine.errors import ModelError
from engine.families.unet import SD_LAYOUT, SDXL_LAYOUT
from engine.model import Conditioning, ModelInfo, TrainableModel
from engine.models.module_state import checkpointed_forwards, recompute_units
from engine.objectives import DDPMObjective

from . import forge_host
from .adapter import SIZE_SLICES, temporary_attr, temporary_option
from .hostkit import (borrowed_weights, clip_backprop_guard, layout_from_ldm_names, text_encoder_layers, text_encoders,
                      unet_blocks, unet_layers)
from .linear_views import linear_views

CHUNK = 77  # one CLIP window, as the A1111 adapter: longer captions are cut here


def sigmas_of(base) -> torch.Tensor:
    """The training schedule's sigmas: Forge's `predictor`, or ComfyUI's `model_sampling` (ldm_patched)."""
    sampling = getattr(base, "predictor", None) or getattr(base, "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if sigmas is None or len(sigmas) < 2:
        raise ModelError("this model has no discrete noise schedule (sigmas); only SD1.x, SD2.x and SDXL "
                         "(eps or v-prediction) can be trained here.")
    return sigmas.detach().float().cpu()


def prediction_of(sd_model, base) -> str:
    """"epsilon" | "v_prediction": Forge's predictor names it; ComfyUI-style model_sampling says it
    with its mixin classes (EPS, V_PREDICTION); A1111's ldm model with `parameterization`."""
    predictor = getattr(base, "predictor", None)
    kind = getattr(predictor, "prediction_type", None)
    if kind is None:
        mixins = {b.__name__ for b in type(getattr(base, "model_sampling", None)).__mro__}
        kind = "v_prediction" if "V_PREDICTION" in mixins else "epsilon" if "EPS" in mixins else None
        if kind is None and getattr(sd_model, "parameterization", None) in ("eps", "v"):
            kind = "v_prediction" if sd_model.parameterization == "v" else "epsilon"
    if kind in ("eps", "epsilon"):
        return "epsilon"
    if kind == "v_prediction":
        return "v_prediction"
    raise ModelError(f"this model predicts with '{kind}' (EDM, flow or x0), which cannot be trained here; "
                     f"SD1.x, SD2.x and SDXL with eps or v prediction can.")


class ForgeModel(TrainableModel):
    def __init__(self, sd_model, *, clip_skip: int = 0):
        self.sd = sd_model
        self.fork = forge_host.fork()
        family = forge_host.family(sd_model)
        if family is None:
            raise ModelError(forge_host.refusal(sd_model, train_text_encoder=False) or "unsupported model")
        objects = getattr(sd_model, "forge_objects", None)
        if objects is None:
            raise ModelError(f"no checkpoint is loaded in {self.fork.name}; pick one at the top of the page.")
        self.base = objects.unet.model
        self.unet = self.base.diffusion_model
        self._sigmas = sigmas_of(self.base)
        prediction = prediction_of(sd_model, self.base)
        layout = layout_from_ldm_names((n for n, _ in self.unet.named_modules()),
                                       SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.info = ModelInfo(family=family, prediction_type=prediction,
                              name=getattr(info, "model_name", "") or "", sha256=getattr(info, "sha256", None),
                              layout=layout, clip_skip=clip_skip or None)
        self.clip_skip = clip_skip
        self._encoders = text_encoders(objects.clip.cond_stage_model, family)
        self.device = torch.device(getattr(objects.unet, "load_device", None) or next(self.unet.parameters()).device)
        self.dtype = (getattr(self.base, "computation_dtype", None) or getattr(self.base, "manual_cast_dtype", None)
                      or next(self.unet.parameters()).dtype)

    # --- layers (listed inside `session`, where Forge's Linears are viewed as nn.Linear) -------------
    def unet_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(unet_layers(self.unet, self.info.layout))

    def text_encoder_layers(self) -> Iterator[tuple[str, str, nn.Module]]:
        """HF names under `text_model.`: transformers 5 flattened CLIPTextModel (no `.text_model`),
        and a fork on it must still write kohya's `lora_te_text_model_encoder_...` keys."""
        for encoder in self._encoders:
            flat = not hasattr(encoder[1], "text_model")
            for prefix, name, module in text_encoder_layers([encoder]):
                yield prefix, ("text_model." + name if flat and name != "text_projection" else name), module

    def text_models(self) -> list[nn.Module]:
        return [te for _, te, _ in self._encoders]

    def trainable_roots(self) -> list[nn.Module]:
        return [self.unet, *self.text_models()]

    def objective(self) -> DDPMObjective:
        """From the fork's predictor: the DDPM schedule its sigmas encode and its prediction kind."""
        return DDPMObjective(1.0 / (1.0 + self._sigmas.double() ** 2).float(), self.info.prediction_type)

    def vae_module(self):
        return getattr(self.sd.forge_objects.vae, "first_stage_model", None)

    # --- compute ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents through the fork's VAE (BHWC in 0..1, as txt2img's
        `encode_first_stage`); cloned so no inference tensor reaches the cache."""
        vae = self.sd.forge_objects.vae
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        latents = vae.encode(images).float()
        latent_format = getattr(self.base, "latent_format", None)
        process_in = latent_format.process_in if latent_format is not None else vae.first_stage_model.process_in
        return process_in(latents).clone().to(self.device)

    def encode_text(self, captions: list[str]) -> Conditioning:
        captions = [str(c) for c in captions]
        with forge_host.no_emphasis(), self._clip_skip():
            if self.fork.lineage == "backend":
                context, pooled = self._encode_backend(captions)
            else:
                context, pooled = self._encode_ldm(captions)
        cond = {"context": context[:, :CHUNK].clone().to(self.device)}
        if "pooled" in self.info.spec.conditioning:
            cond["pooled"] = pooled.clone().to(self.device)
        return cond

    def _encode_backend(self, captions):
        """Forge/Neo: the engines `get_learned_conditioning` runs, without its inference mode."""
        if self.info.family != "sdxl":
            return self.sd.text_processing_engine(captions), None
        cond_l = self.sd.text_processing_engine_l(captions)
        cond_g, pooled = self.sd.text_processing_engine_g(captions)
        return torch.cat([cond_l, cond_g], dim=2), pooled

    def _encode_ldm(self, captions):
        """reForge/Classic: A1111's conditioning, whose CLIP modules are the forge objects' own."""
        if self.info.family != "sdxl":
            return self.sd.get_learned_conditioning(captions), None
        from modules import prompt_parser

        out = self.sd.get_learned_conditioning(prompt_parser.SdConditioning(captions, width=1024, height=1024))
        sizes = sum(int(e.outdim) * 2 for e in self.sd.conditioner.embedders
                    if getattr(e, "input_key", None) in SIZE_SLICES)
        vector = out["vector"]
        return out["crossattn"], vector[:, :vector.shape[1] - sizes]  # pooled CLIP-G, then the size embeddings

    @contextlib.contextmanager
    def _clip_skip(self):
        if not self.clip_skip:
            yield
            return
        from modules import shared

        if self.fork.lineage == "ldm_patched":
            with temporary_option(shared.opts, "CLIP_stop_at_last_layers", self.clip_skip):
                yield
            return
        engines = [getattr(self.sd, a) for a in ("text_processing_engine", "text_processing_engine_l",
                                                  "text_processing_engine_g") if hasattr(self.sd, a)]
        old = [e.clip_skip for e in engines]
        for e in engines:
            e.clip_skip = self.clip_skip
        try:
            yield
        finally:
            for e, skip in zip(engines, old):
                e.clip_skip = skip

    def _sdxl_y(self, cond: Conditioning, batch: int, height: int, width: int) -> torch.Tensor:
        """SDXL's ADM vector: pooled CLIP-G + Timestep(256) of the six size ids, as both lineages build it."""
        ids = cond.get("time_ids")
        if ids is None:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
        embedder = getattr(self.base, "embedder", None) or self.sd.embedder
        emb = embedder(ids.float().to(self.device).flatten()).reshape(ids.shape[0], -1)
        return torch.cat([cond["pooled"].float().to(self.device), emb.to(self.device)], dim=1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self._moved_away():  # encoding or a preview made the fork's manager offload the UNet
            forge_host.load_for_training(self.sd, with_text_encoder=False)
        x = noisy.to(self.device, self.dtype)
        context = cond["context"].to(self.device, self.dtype)
        kwargs = {}
        if self.info.family == "sdxl":
            kwargs["y"] = self._sdxl_y(cond, x.shape[0], x.shape[-2] * 8, x.shape[-1] * 8).to(self.dtype)
        return self.unet(x, timesteps.to(self.device).float(), context=context, control=None,
                         transformer_options={}, **kwargs)

    def _moved_away(self) -> bool:
        weight = next(self.unet.parameters(), None)
        return weight is not None and weight.device.type != self.device.type

    # --- lifetime -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, gradient_checkpointing: bool, train_text_encoder: bool):
        reason = forge_host.refusal(self.sd, train_text_encoder=train_text_encoder)
        if reason:
            raise ModelError(reason)
        forge_host.load_for_training(self.sd, with_text_encoder=train_text_encoder)
        swap = [self.unet] + (self.text_models() if train_text_encoder else [])
        with contextlib.ExitStack() as stack:
            stack.enter_context(_modes_kept(self.trainable_roots()))
            stack.enter_context(linear_views(self.trainable_roots()))
            stack.enter_context(borrowed_weights(self.trainable_roots(), swap))
            if gradient_checkpointing:
                stack.enter_context(checkpointed_forwards(recompute_units(unet_blocks(self.unet)),
                                                          copy_dict_args=True))
            if train_text_encoder:
                stack.enter_context(clip_backprop_guard(self.text_models()))
                for embedder in getattr(getattr(self.sd, "conditioner", None), "embedders", []):
                    if getattr(embedder, "input_key", None) == "txt":  # sgm runs the others under no_grad
                        stack.enter_context(temporary_attr(embedder, "is_trainable", True))
            yield self

    # --- previews -----------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], *, seed: int, steps: int, cfg: float, width: int, height: int,
               negative: str = "") -> list:
        """Previews through the fork's own txt2img with the LoRA hooks as attached (if sampling makes
        the fork offload the UNet, the next `predict` loads it back)."""
        from .previews import txt2img_images

        return txt2img_images(prompts, negative=negative, seed=seed, steps=steps, cfg=cfg, width=width,
                              height=height)


@contextlib.contextmanager
def _modes_kept(roots: list[nn.Module]):
    """train/eval flags back as they were (requires_grad is `borrowed_weights`' job: an inference
    tensor's flag can only be set back inside inference mode)."""
    modes = [(m, m.training) for r in roots for m in r.modules()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag
