"""The training step replayed as one CUDA graph, so the GPU never waits on Python.

An SD UNet step with LoRA is 3,000 (SD1.5) to 15,000 (SDXL + checkpointing) kernel launches. At
small batches the host cannot issue them as fast as an H100 runs them, which is why eager trainers
run no faster on an H100 than on a far smaller card. Here every step of one input shape (one
bucket) is captured once (forward, backward, gradient clipping, fused AdamW) and replayed with a
single launch; the host only copies the batch into static buffers and draws the noise.

The math is the plain step's (both call the training step's `loss`, engine/step.py, over its tensor
dict; the graph's static buffers are that dict's tensors, by key, so any family's or objective's
inputs are graphed alike); the one difference, which does not change results, is that the learning
rate lives in a device tensor the scheduler fills, so a replay sees the current value. Gradients are created by backward and dropped after the optimizer step, in
the graph as in the plain step (PyTorch's whole-network capture pattern): they live only from the
layer that makes them to the step, so the graph's memory peak (mid-backward, activations still
held) does not carry a full set of gradients (162 MiB for SDXL on kohya's layers). Buffers dropped
in a capture stay in the graphs' private pool, where only later captures reuse them.
What the graph cannot hold falls back to the plain step with the reason logged: fp16 (the grad
scaler decides on the host), gradient accumulation, optimizers other than AdamW, text-encoder
training and captions that change every step (shuffled or tag-dropped: encoded on the host each
step), and any capture that fails. The training features ride along: pyramid and input-perturbation
noise are draws (host side), a loss mask is one more key of the tensor dict, block-wise learning
rates are param groups of the captured AdamW, the EMA of the weights is updated after each replay,
and the validation loss runs eagerly between steps. A shape is
run once eagerly (the warm-up CUDA graphs need; it is a real training step) and captured the
second time it comes; at most `MAX_GRAPHS` shapes get graphs, all sharing one memory pool.

`FastStep(..., capture=False)` runs the same static-buffer step without graphs
(`EngineOptions(fast_step_without_graph=True)`): that is how the CPU tests check that the fast path
trains exactly like the plain one, bit for bit (`_tensor_lr` says what that takes on the CPU).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)
MAX_GRAPHS = 16
CPU_LR_DTYPE = torch.float64  # the learning-rate tensor's dtype on the CPU (`FastStep._tensor_lr` says why)


def unsupported_reason(cfg, device: torch.device, precision: str, optimizer, train_te: bool) -> str | None:
    """Why the graphed step cannot run for this config, or None when it can (an image run asks
    `graph_refusal`, which adds what the run has switched on since it started)."""
    if not cfg.cuda_graph:
        return "cuda_graph is off"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if precision == "fp16":
        return "fp16 needs the grad scaler, which decides on the host (use bf16)"
    if cfg.gradient_accumulation_steps != 1:
        return "gradient accumulation is on"
    if not isinstance(optimizer, torch.optim.AdamW) or not optimizer.defaults.get("fused"):
        return f"{cfg.optimizer} is not the fused AdamW"
    if train_te:
        return "the text encoder is trained (captions are tokenised on the host every step)"
    if getattr(cfg, "shuffle_caption", False) or getattr(cfg, "caption_tag_dropout_rate", 0):
        return "captions change every step (shuffle_caption, caption_tag_dropout_rate): they are encoded on the host"
    return None


def graph_refusal(trainer, checkpointing: bool, *, offloading: bool, capture: bool = True) -> str | None:
    """Why an image run's step cannot take the fast step now, or None: the one decision, made when the
    run starts and again each time the out-of-memory recovery changes the step (engine/memory/
    recovery.py). `checkpointing`: gradient checkpointing is on now, from the config or turned on by
    the recovery. Checkpointed blocks that copy their inputs to host memory cannot be graphed; they do
    when checkpointing is on, `offloading` (the run's `cpu_offload_checkpointing` switch, from the config
    or the recovery: the caller reads `flux_offload.offloading()`, a layer above this one) and the
    family's forward honours it (Flux.1; elsewhere the option does nothing and costs no graph).
    `capture=False` asks for the static-buffer step without graphs
    (`EngineOptions.fast_step_without_graph`, the CPU tests'): the config's limits, which are the
    graph's, are not asked; offloading and several GPUs still refuse it, as they refuse the graph."""
    cfg = trainer.cfg
    train_te = bool(trainer.network.text_encoder_parameters()) and not trainer.frozen_te
    why = unsupported_reason(cfg, trainer.device, trainer.precision, trainer.optimizer, train_te) if capture else None
    if why is None and checkpointing and offloading and trainer.model.info.spec.offload_checkpointing:
        why = "cpu_offload_checkpointing copies block inputs to host memory"
    if why is None and trainer.dist.enabled:
        why = "several GPUs (the gradient all-reduce runs in the plain step)"
    return why


def host_lrs(scheduler, optimizer) -> list[float]:
    """The current learning rates as floats, without reading a device tensor (that would sync)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None and len(lambdas) == len(scheduler.base_lrs):
        return [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    return [float(g["lr"]) for g in optimizer.param_groups]


@contextlib.contextmanager
def _checkpoint_without_rng_stash():
    """Activation checkpointing stashes the CUDA RNG state by default, which cannot be read while a
    graph is captured. With no dropout in the checkpointed region there is nothing to restore, so
    during capture checkpoints are taken with preserve_rng_state=False (the results are the same)."""
    import torch.utils.checkpoint as tuc

    original = tuc.checkpoint

    def checkpoint(function, *args, **kwargs):
        kwargs["preserve_rng_state"] = False
        return original(function, *args, **kwargs)

    tuc.checkpoint = checkpoint
    try:
        yield
    finally:
        tuc.checkpoint = original


def _drop_cublas_workspaces() -> None:
    """cuBLAS keeps a workspace (32 MiB on an H100, allocated through PyTorch's allocator) per stream it
    ran on; freeing the ones no longer used keeps them out of the training peak (torch's private API,
    as torch.compile's CUDA graphs use it; skipped where a build lacks it)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class _Graph:
    def __init__(self, graph, inputs: dict, loss: torch.Tensor):
        self.graph, self.inputs, self.loss = graph, inputs, loss


class FastStep:
    """One optimizer step per call: copy in, replay (or warm up / capture), return the loss."""

    LIMIT_HINT = ("fewer buckets (a coarser bucket_reso_steps, a narrower min/max_bucket_reso) keep every "
                  "step graphed")  # what makes the shapes fewer (`_past_limit`)

    def __init__(self, step, *, optimizer, scheduler, params, max_grad_norm: float, capture: bool = True,
                 say=None):
        self.step_fn = step  # engine.step.TrainingStep
        self._setup(optimizer=optimizer, scheduler=scheduler, params=params, max_grad_norm=max_grad_norm,
                    device=step.device, capture=capture,
                    dropout=any(getattr(m, "dropout", 0) for m in step.network.loras.values()), say=say)

    def _setup(self, *, optimizer, scheduler, params, max_grad_norm: float, device, capture: bool,
               dropout: bool, say=None) -> None:
        """The graph state every graphed step keeps (the image step above, the text mode's TextGraphStep).
        `say`: tells the user (the run's status line) what changes the step's speed; the log otherwise."""
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.device = device
        self.capture = capture
        self.say = say or logger.warning
        self.told_limit = False
        self.params = [p for p in params if p.requires_grad]
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.eager_only: set[tuple] = set()
        self.pool = None
        self._side = None  # one side stream for every warm-up and capture: cuBLAS keeps a workspace per stream
        self.dropout = dropout  # LoRA dropout draws RNG in the step
        self.steps = 0  # optimizer steps this fast step took
        self._tensor_lr(optimizer, device)

    # --- learning rate in a device tensor -----------------------------------------------------------
    def _tensor_lr(self, optimizer, device) -> None:
        """The learning rates in device tensors. On the CPU in float64: there AdamW computes its decay
        factor (1 - lr * weight_decay) and step size (lr / bias correction) from a tensor lr in the
        tensor's dtype, and from a float lr in Python's double, rounded to float32 once at the end; a
        float32 lr tensor rounds the lr and each intermediate too (about 1e-7 relative in those two
        scalars), which left the CPU tests' five-step fast runs' LoRA weights up to 3e-8 away from the
        plain step's. In float64 the two do the same arithmetic and train bit for bit alike. CUDA keeps
        the float32 tensor the graph has always captured its fused AdamW with."""
        dtype = CPU_LR_DTYPE if device.type == "cpu" else torch.float32
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)
            if self.capture:
                group["capturable"] = True
        sched = self.scheduler
        sched._last_lr = host_lrs(sched, optimizer)

        def plain_state(_opt, state):
            # checkpoints stay what the plain step writes: float lr, not capturable
            for group, lr in zip(state["param_groups"], host_lrs(self.scheduler, optimizer)):
                group["lr"] = lr
                group["capturable"] = False
            return state

        self._hook = optimizer.register_state_dict_post_hook(plain_state)

    def close(self) -> None:
        """Give the optimizer back as the plain step expects it (float lr, grads None)."""
        opt = self.optimizer
        self._hook.remove()
        for group, lr in zip(opt.param_groups, host_lrs(self.scheduler, opt)):
            group["lr"] = lr
            group["capturable"] = False
        self._drop_grads()
        self.graphs.clear()

    def lr(self) -> float:
        return host_lrs(self.scheduler, self.optimizer)[0]

    def scheduler_step(self) -> None:
        """Advance the schedule: the scheduler fills the lr tensors the graphs read (no host sync)."""
        opt, sched = self.optimizer, self.scheduler
        tensors = [g["lr"] for g in opt.param_groups]
        sched.step()
        for group, tensor in zip(opt.param_groups, tensors):
            if group["lr"] is not tensor:  # a scheduler that assigns floats: keep the graphs' tensor
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor
        sched._last_lr = host_lrs(sched, opt)  # floats, as the plain step leaves them

    # --- the step -----------------------------------------------------------------------------------
    @staticmethod
    def _key(tensors: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))

    def _body(self, inp: dict) -> torch.Tensor:
        step = self.step_fn
        self._drop_grads()
        with step.network.cast_weights(step.cast_dtype):
            loss = step.loss(inp)
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self._drop_grads()
        return loss.detach()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, batch) -> torch.Tensor | None:
        """Train one step on `batch` and return its loss (on the device), or None when this batch
        must take the plain path (the caller then runs it; grads are left None for that)."""
        if batch.cond is None:
            return self._decline("no cached text conditioning")
        inp = self.step_fn.tensors(batch, self.step_fn.draw(batch))
        self.steps += 1
        if not self.capture:
            return self._body(inp)
        key = self._key(inp)
        graph = self.graphs.get(key)
        if graph is not None:
            for k, v in inp.items():
                graph.inputs[k].copy_(v, non_blocking=True)
            graph.graph.replay()
            return graph.loss
        if key in self.eager_only or self._past_limit(key):
            return self._eager(inp)
        if key not in self.seen:  # warm-up: a real step, eagerly, on a side stream
            if not self.seen:
                _drop_cublas_workspaces()  # the caching phase's, on the default stream
            self.seen.add(key)
            return self._eager(inp)
        try:
            graph = self._capture(inp)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: train this shape eagerly
            logger.warning("could not capture the training step as a CUDA graph (%s: %s); this shape runs "
                           "eagerly", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.eager_only.add(key)
            torch.cuda.synchronize(self.device)
            return self._eager(inp)
        self.graphs[key] = graph
        graph.graph.replay()
        return graph.loss

    def _past_limit(self, key) -> bool:
        """Whether this shape comes back after `MAX_GRAPHS` shapes already have graphs: it then runs
        eagerly, slower, and the user hears it once (many aspect-ratio buckets at 1024 can pass 16)."""
        if key not in self.seen or len(self.graphs) < MAX_GRAPHS:
            return False
        if not self.told_limit:
            self.told_limit = True
            self.say(f"more than {MAX_GRAPHS} input shapes in this run: the first {MAX_GRAPHS} are CUDA-graphed, "
                     f"the others train without the graph (slower); {self.LIMIT_HINT}")
        return True

    def _side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _eager(self, inp: dict) -> torch.Tensor:
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self._body(inp)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture(self, inp: dict) -> _Graph:
        if not self.graphs:
            torch.cuda.synchronize(self.device)
            _drop_cublas_workspaces()  # the warm-up's: the graph gets its own in its pool
            torch.cuda.empty_cache()  # the warm-up's cached blocks, so the graph's pool can use them
        graph = torch.cuda.CUDAGraph()
        rng = contextlib.nullcontext() if self.dropout else _checkpoint_without_rng_stash()
        with rng, torch.cuda.graph(graph, pool=self.pool, stream=self._side_stream(),
                                   capture_error_mode="thread_local"):
            loss = self._body(inp)
        self.pool = graph.pool()
        return _Graph(graph, inp, loss)

    def _decline(self, why: str) -> None:
        if why not in getattr(self, "_declined", set()):
            self.__dict__.setdefault("_declined", set()).add(why)
            logger.info("plain training step for some batches: %s", why)
        self._drop_grads()
        return None
