"""kohya's own training step replayed on the draws our trainer made, in kohya's Python (KOHYA_PYTHON, with
KOHYA_DIR and LYCORIS_DIR on PYTHONPATH): does kohya, given the same start, batches, noise and timesteps,
move the LoRA exactly where ours does? tests/engine/test_quality_kohya_step.py runs it.

    python bench/quality_kohya_step.py <recorded.pt> <out.safetensors> <train_network.py arguments>

`recorded.pt` holds our network's weights before the first step (its kohya keys) and, per step, the batch
as our step saw it (scaled latents, text conditioning, loss weights) and our draws (noise, timesteps).
From kohya (untouched): the argument parser and its defaults, `create_network` of the network module the
arguments name, `apply_to`, the optimizer parameter groups, `get_optimizer`, `get_scheduler_fix`, the
noise scheduler, and `process_batch` (noise, noisy latents, timesteps, U-Net call, v target, loss, its
reduction and weights). The glue is train_network.py's loop body (backward, clip over
`get_trainable_params`, optimizer and schedule step). Two stand-ins: the draws come from the recording
(kohya's `torch.randn_like` and `get_timesteps` return them while `process_batch` runs), and the latents
arrive scaled (the scale factor set to 1; ours and kohya's multiply by the same one, bench/quality_kohya.py).
"""

import contextlib
import importlib
import sys


class _Accelerator:
    """What process_batch asks of accelerate's Accelerator on one CPU process."""

    device = "cpu"

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


@contextlib.contextmanager
def _draws(train_util, torch, noise, timesteps):
    """kohya's own draws replaced by the recorded ones while one batch is processed."""
    randn_like, get_timesteps = torch.randn_like, train_util.get_timesteps
    torch.randn_like = lambda *a, **k: noise.clone()
    train_util.get_timesteps = lambda *a, **k: timesteps.clone()
    try:
        yield
    finally:
        torch.randn_like, train_util.get_timesteps = randn_like, get_timesteps


def main(recorded_path: str, out_path: str, argv: list[str]) -> None:
    import torch
    import train_network
    from library import train_util
    from safetensors.torch import save_file

    from quality_kohya import demo_parts

    parser = train_network.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    recorded = torch.load(recorded_path)
    text_encoder, vae, unet = demo_parts(args.pretrained_model_name_or_path)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()  # train_network.py without gradient checkpointing

    trainer = train_network.NetworkTrainer()
    trainer.vae_scale_factor = 1.0  # the recorded latents are already scaled
    net_kwargs = dict(a.split("=", 1) for a in (args.network_args or []))
    net_kwargs.setdefault("dropout", args.network_dropout)
    network_module = importlib.import_module(args.network_module)
    network = network_module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
                                            neuron_dropout=args.network_dropout, **net_kwargs)
    network.apply_to(text_encoder, unet, False, True)
    missing, unexpected = network.load_state_dict(recorded["initial"], strict=False)
    if unexpected or [k for k in missing if not k.endswith("alpha")]:
        raise RuntimeError(f"our initial weights do not fit kohya's network: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        params = network.prepare_optimizer_params_with_multiple_te_lrs(args.text_encoder_lr, args.unet_lr,
                                                                        args.learning_rate)
    else:
        params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    params = params[0] if isinstance(params, tuple) else params
    _, _, optimizer = train_util.get_optimizer(args, params)
    lr_scheduler = train_util.get_scheduler_fix(args, optimizer, 1)
    noise_scheduler = trainer.get_noise_scheduler(args, "cpu")
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)  # network.train()

    for step in recorded["steps"]:
        batch = {"latents": step["latents"], "text_encoder_outputs_list": [step["context"]],
                 "loss_weights": step["loss_weights"]}
        with _draws(train_util, torch, step["noise"], step["t"]):
            loss = trainer.process_batch(batch, [text_encoder], unet, network, vae, noise_scheduler, torch.float32,
                                         torch.float32, _Accelerator(), args, None, None, is_train=True,
                                         train_text_encoder=False, train_unet=True)
        loss.backward()
        if args.max_grad_norm != 0.0:
            torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"loss {float(loss):.8f}")
    save_file({k: v.detach().float().contiguous() for k, v in network.state_dict().items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
