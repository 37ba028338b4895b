"""One training step of a text run: the loss of a batch, and the step replayed as a CUDA graph.

`TextForward.loss(inputs)` is the whole forward: the lean decoder (engine/text/lean.py) where the model
allows it, else transformers' own backbone (with its own packed-sequence mask from the restarting
positions), then the chunked next-token loss (engine/text/loss.py) on the output projection. Plain and
graphed steps call the same function.

`TextGraphStep` is the image step's CUDA-graph machinery (engine/fast_step.FastStep: learning rate in a
device tensor, warm-up on a side stream, capture, one memory pool, fallback to eager on any capture
failure) with the text batch's static buffers: input ids, targets, positions, segments and the
step's trained-token count. A batch shape (and whether its rows hold several samples) is run eagerly
once and captured the second time it comes.
"""

from __future__ import annotations

import torch

from ..fast_step import FastStep
from .lean import LeanDecoder, lean_reason
from .loss import lm_loss, logits_loss

_SCALED_HEADS = ("logit_scale", "logits_scaling")


class TextForward:
    def __init__(self, peft_model, cfg, say=lambda message: None):
        self.peft_model = peft_model
        self.lm = peft_model.get_base_model()
        self.checkpointing = cfg.gradient_checkpointing
        self.lean_reason = "fast_path is off" if cfg.fast_path == "off" else lean_reason(self.lm, cfg.max_length)
        self.lean = LeanDecoder(self.lm) if self.lean_reason is None else None
        if cfg.torch_compile:
            self._compile(say)
        head = self.lm.get_output_embeddings()
        config = self.lm.config
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        self.plain_head = (type(head) is torch.nn.Linear and head.bias is None
                           and all(getattr(config, k, None) in (None, 1, 1.0) for k in _SCALED_HEADS))
        self.head = head
        if self.lean is None and self.checkpointing:
            if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers 5's name
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.lm, "enable_input_require_grads"):
                self.lm.enable_input_require_grads()

    def _compile(self, say) -> None:
        from .. import compiled_loss

        device = next(self.lm.parameters()).device
        if self.lean is None:
            say(f"torch_compile: needs the lean forward ({self.lean_reason}); training without it")
        elif device.type not in compiled_loss.DEVICES:
            say(f"torch_compile: runs on CUDA only (not checked on {device.type}); training without it")
        else:
            self.lean.run_layer = compiled_loss.CompiledLoss(self.lean._layer, say, "a decoder layer")

    def close(self) -> None:
        """The run's end: the compiled decoder layer's graphs go with it (compiled_loss.py says why)."""
        release = getattr(self.lean.run_layer, "release", None) if self.lean is not None else None
        if release is not None:
            release()

    @property
    def path(self) -> str:
        return "lean" if self.lean is not None else "transformers"

    def loss(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token NLL of the batch's trained tokens over inp["denominator"]."""
        if not self.plain_head:
            logits = self.lm(input_ids=inp["input_ids"], position_ids=inp["position_ids"], use_cache=False).logits
            return logits_loss(logits, inp["targets"], inp["denominator"])
        if self.lean is not None:
            hidden = self.lean(inp["input_ids"], inp["position_ids"], inp["segments"], bool(inp["masked"]),
                               self.checkpointing)
        else:
            hidden = self.lm.base_model(input_ids=inp["input_ids"], position_ids=inp["position_ids"],
                                        use_cache=False).last_hidden_state
        return lm_loss(hidden, self.head.weight, inp["targets"], inp["denominator"], self.softcap)


def device_inputs(batch: dict, device: torch.device, denominator: float) -> dict:
    """A host batch (engine/text/packing.collate) on the device, with the step's trained-token count.
    Copied from pinned memory without waiting, so the host prepares the next step while the GPU runs."""
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    tensors["denominator"] = torch.tensor(float(denominator))
    pin = device.type == "cuda"
    out = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in tensors.items()}
    out["masked"] = bool(batch["masked"])
    return out


class TextGraphStep(FastStep):
    """One optimizer step per call (accumulation off): copy in, replay (or warm up / capture)."""

    LIMIT_HINT = "packing: true (rows of max_length) keeps every step graphed"

    def __init__(self, trainer, *, capture: bool = True):
        self.t = trainer
        # dropout masks are drawn in the step; nothing is recomputed with RNG
        self._setup(optimizer=trainer.optimizer, scheduler=trainer.scheduler, params=trainer.params,
                    max_grad_norm=trainer.cfg.max_grad_norm, device=trainer.device, capture=capture,
                    dropout=trainer.cfg.lora_dropout > 0,
                    say=lambda text: trainer.events.emit("info", message=text))

    def _body(self, inp: dict) -> torch.Tensor:
        t = self.t
        self._drop_grads()
        loss = t.forward.loss(inp)
        loss.backward()
        if t.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.cfg.max_grad_norm, foreach=True)
        t.optimizer.step()
        self._drop_grads()
        return loss.detach()

    def step(self, batch: dict, denominator: float) -> torch.Tensor:
        inp = device_inputs(batch, self.t.device, denominator)
        if not self.capture:
            return self._body(inp)
        key = (tuple(inp["input_ids"].shape), inp["masked"])
        graph = self.graphs.get(key)
        if graph is not None:
            for name, static in graph.inputs.items():
                if isinstance(static, torch.Tensor):
                    static.copy_(inp[name], non_blocking=True)
            graph.graph.replay()
            return graph.loss
        if key in self.eager_only or self._past_limit(key):
            return self._eager(inp)
        if key not in self.seen:  # warm-up: a real step, eagerly, on the side stream
            self.seen.add(key)
            return self._eager(inp)
        try:
            graph = self._capture(inp)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: train this shape eagerly
            self.t.events.emit("info", message=f"training step not CUDA-graphed for rows of {key[0]} "
                                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            self.eager_only.add(key)
            torch.cuda.synchronize(self.t.device)
            return self._eager(inp)
        self.graphs[key] = graph
        graph.graph.replay()
        return graph.loss
