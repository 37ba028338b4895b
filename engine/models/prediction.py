"""Epsilon or v? Deciding a checkpoint's prediction type when the config says `auto`.

SD2.x ships in two flavours with identical weights layout: 512-base predicts noise (epsilon) and
768-v predicts velocity. Nothing in the file names the difference for certain, so the hosts guess:

- ComfyUI writes a `v_pred` key into checkpoints it saves from v models and trusts it (SDXL v-pred
  fine-tunes carry it too); for SD2 files without it, it checks whether the std of
  `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09.
- A1111 (`is_using_v_parameterization_for_sd2`) runs the UNet once at t=999 on a constant input and
  calls it v when `mean(out - x) < -1`, and it honours a `<checkpoint>.yaml` beside the file.
- diffusers reads `prediction_type` from the folder's scheduler config.

Our order: config value > `v_pred` key > diffusers scheduler config > A1111-style sidecar yaml >
(SD2 only) A1111's test forward, cross-checked with ComfyUI's statistic > epsilon. The decision and
its reason are logged with the override to use (`prediction_type: epsilon|v_prediction`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .detect import Detection, name_suggests_v

logger = logging.getLogger(__name__)

EPS, V = "epsilon", "v_prediction"
_COMFY_STD_KEY = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"  # LDM output_blocks.11.1...


def sidecar_yaml_parameterization(path: Path | None) -> str | None:
    """'v' / 'eps' from an A1111-style `<checkpoint stem>.yaml` next to the file, if there is one."""
    if path is None or Path(path).is_dir():
        return None
    yaml_path = Path(path).with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        params = (data.get("model") or {}).get("params") or {}
    except Exception as exc:  # a broken yaml must not stop training; it is only a hint
        logger.warning("could not read %s (%s); ignoring it", yaml_path.name, exc)
        return None
    return str(params.get("parameterization", "eps")).strip().lower()


@torch.no_grad()
def sd2_test_forward(unet) -> float:
    """A1111's probe: mean(unet(x, t=999, ctx) - x) with x and ctx constant 0.5; below -1 means v."""
    p = next(unet.parameters())
    ctx_dim = unet.config.cross_attention_dim
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, ctx_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999], device=p.device)
    out = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    return float((out.float() - x.float()).mean().cpu())


def comfy_std_statistic(unet) -> float | None:
    """ComfyUI's SD2 hint: std of one late transformer norm bias (v models: > 0.09)."""
    try:
        bias = unet.get_submodule(_COMFY_STD_KEY.rsplit(".", 1)[0]).bias
    except AttributeError:
        return None
    return float(bias.detach().float().std(unbiased=False).cpu())


def resolve_prediction_type(requested: str, det: Detection, *, path: Path | None = None, unet=None,
                            notes: list[str] | None = None) -> str:
    """Pick epsilon or v_prediction; log (and append to `notes`) how and how to override."""
    notes = notes if notes is not None else []
    name = Path(path).name if path else "the model"

    def decided(ptype: str, why: str) -> str:
        other = EPS if ptype == V else V
        msg = f"prediction type: {ptype} ({why}); if that is wrong set prediction_type: {other}"
        logger.info(msg)
        notes.append(msg)
        return ptype

    if requested in (EPS, V):
        logger.info("prediction type: %s (set in the config)", requested)
        return requested
    if det.v_pred_marker:
        return decided(V, "the checkpoint has a 'v_pred' key, as ComfyUI writes for v-prediction models")
    if det.scheduler_prediction_type in (EPS, V):
        return decided(det.scheduler_prediction_type, "from the diffusers folder's scheduler config")
    yaml_param = sidecar_yaml_parameterization(path)
    if yaml_param is not None:
        return decided(V if yaml_param == "v" else EPS, f"from {Path(path).with_suffix('.yaml').name} beside it")
    if det.family == "sd2" and unet is not None and det.standard:
        probe = sd2_test_forward(unet)
        by_probe = V if probe < -1 else EPS
        std = comfy_std_statistic(unet)
        by_std = None if std is None else (V if std > 0.09 else EPS)
        if by_std is not None and by_std != by_probe:
            warn = (f"prediction type of {name} is unclear: A1111's test forward says {by_probe} "
                    f"(mean {probe:.2f}), ComfyUI's statistic says {by_std} (std {std:.3f}); using "
                    f"{by_probe}. Set prediction_type explicitly (768-v models: v_prediction, 512-base: epsilon).")
            logger.warning(warn)
            notes.append(warn)
        return decided(by_probe, f"SD2 test forward at t=999: mean(out - x) = {probe:.2f}, "
                                 f"{'below' if by_probe == V else 'not below'} -1, as A1111 decides")
    if name_suggests_v(name):
        msg = (f"{name}'s name suggests v-prediction but nothing in the file says so; training as "
               f"epsilon. Set prediction_type: v_prediction if it is a v model.")
        logger.warning(msg)
        notes.append(msg)
        return EPS
    return decided(EPS, f"the {det.family} default")
