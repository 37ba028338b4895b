"""kohya sd-scripts' train_network.py on the demo model, run by bench/quality_runs.py in kohya's own
Python (KOHYA_PYTHON; KOHYA_DIR and, for lycoris.kohya, LYCORIS_DIR on PYTHONPATH).

    python bench/quality_kohya.py <train_network.py arguments>

Two things differ from a plain `python train_network.py`, both because the demo model is a toy:
- kohya converts a diffusers UNet into its own copy of SD1's UNet class, whose block widths are SD1's
  (320-1280); the demo UNet (32-64 wide, three levels) does not fit it. Its diffusers UNet is used as
  it is: the same blocks and names (kohya's copy mirrors diffusers' layout, so `networks.lora` and
  LyCORIS find the same Transformer2DModel layers), called as kohya calls its own (`unet(x, t, ctx).sample`).
- kohya scales SD1 latents by 0.18215; the demo VAE's own scaling factor (in its config) is used.
- the text encoder's file is written by our transformers 5, whose CLIPTextModel keys have no
  `text_model.` prefix; kohya's transformers 4 would skip them all with a warning and train on a
  randomly initialised text encoder (every caption's conditioning wrong). The weights are loaded
  with the prefix restored, and a key still missing or left over stops the run.
Everything else (data loading, latent caching, noise, timesteps, loss, network, optimizer, saving) is
kohya's own code, untouched.
"""

import sys


def main(argv: list[str]) -> None:
    import train_network
    from library import model_util

    def load_target_model(self, args, weight_dtype, accelerator):
        text_encoder, vae, unet = demo_parts(args.pretrained_model_name_or_path)
        self.vae_scale_factor = vae.config.scaling_factor
        return model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization), text_encoder, vae, unet

    train_network.NetworkTrainer.load_target_model = load_target_model
    parser = train_network.setup_parser()
    args = parser.parse_args(argv)
    from library import train_util

    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    train_network.NetworkTrainer().train(args)


def demo_parts(path: str):
    """The demo pipeline folder's text encoder, VAE and UNet, as kohya's train_network gets them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    return _text_encoder(path), vae, UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def _text_encoder(path: str):
    """The demo's CLIP text encoder with every weight of its file, whichever transformers wrote it."""
    import os

    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = os.path.join(path, "text_encoder")
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    weights = {k if k.startswith("text_model.") else f"text_model.{k}": v
               for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise RuntimeError(f"the demo text encoder does not fit kohya's CLIPTextModel: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()


if __name__ == "__main__":
    main(sys.argv[1:])
