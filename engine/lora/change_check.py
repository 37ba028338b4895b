"""Did the run change the LoRA? Which layers received no gradient?

A run whose every gradient was zero (a model whose layers the hooks never reach, a loss that does not
depend on the LoRA, a learning rate of 0) still writes a file; it must not look like a success. Each
trained module's up weight (a LoHa/LoKr module's factor that starts at zero: `zero_start()`) is noted
when the loop starts (a fresh LoRA's is all zeros: nothing is copied) and compared at the end: a module that received no gradient still has it, or (with weight
decay on a loaded LoRA) a scaled copy of it. Adam moves every element that gets a gradient on its
own, so a moved layer never looks like a scaled copy.

Only whole findings are reported: the whole LoRA, UNet layers (every one of them is on the loss's
path), or a whole text encoder. Single text-encoder layers may rightly get none: with clip_skip the
last layers' outputs are not used.
"""

from __future__ import annotations

import torch

from .network import LoRANetwork

_SHOWN = 8


class ChangeCheck:
    def __init__(self, network: LoRANetwork, step: int):
        self.step = step
        self.start: dict[str, torch.Tensor | None] = {}  # None: all zeros (a fresh LoRA)
        trained = {k: m.zero_start().detach() for k, m in network.loras.items() if m.zero_start().requires_grad}
        if not trained:
            return
        nonzero = torch.stack([w.abs().amax() for w in trained.values()]).gt(0).tolist()  # one device sync
        for (key, weight), moved in zip(trained.items(), nonzero):
            self.start[key] = weight.to("cpu", torch.float32, copy=True) if moved else None

    def unchanged(self, network: LoRANetwork) -> list[str]:
        """Keys of the trained modules whose weights are still what they were at the start."""
        keys = list(self.start)
        if not keys:
            return []
        ups = [network.loras[k].zero_start().detach() for k in keys]
        peaks = torch.stack([w.abs().amax() for w in ups]).tolist()
        out = []
        for key, up, peak in zip(keys, ups, peaks):
            before = self.start[key]
            if before is None:
                if peak == 0:
                    out.append(key)
                continue
            after = up.to("cpu", torch.float32)
            scale = float((after * before).sum() / (before * before).sum())
            if float((after - scale * before).norm()) <= 1e-6 * float(before.norm()) and 0 <= scale <= 1:
                out.append(key)
        return out

    def warning(self, network: LoRANetwork, step: int) -> str | None:
        """One line for the end of a run that made steps, or None when every part of the LoRA learned."""
        if step <= self.step or not self.start:
            return None
        still = self.unchanged(network)
        if len(still) == len(self.start):
            return (f"the LoRA did not change: none of its {len(still)} layers received a gradient in "
                    f"{step - self.step} steps (e.g. {_names(still)}). The file was written but does nothing. "
                    f"Check learning_rate (0?) and that the model is one the trainer supports; a model whose "
                    f"layers the LoRA hooks never reach trains nothing.")
        unet = [k for k in self.start if k not in network.te_keys]
        still_unet = [k for k in still if k not in network.te_keys]
        te = [k for k in self.start if k in network.te_keys]
        parts = []
        if still_unet:
            parts.append(f"{len(still_unet)} of {len(unet)} UNet layers received no gradient ({_names(still_unet)})")
        if te and all(k in still for k in te):
            parts.append(f"the text-encoder LoRA did not change (none of its {len(te)} layers received a gradient)")
        return ("; ".join(parts) + ": those layers of the file do nothing.") if parts else None


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more
