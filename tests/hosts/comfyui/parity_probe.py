"""Run with the ComfyUI venv's python: train through the ComfyUI adapter in process (no server) on the
random SD1.5 checkpoint, loaded by ComfyUI's own Load Checkpoint code, and print each run's record
(tests/parity_fixture.py) as JSON, once as the engine runs it ("current") and once with the noise
generator seeded as the engine before the redesign seeded it ("old_noise_seed"). test_comfy_parity.py
compares them with the recorded ones.

    $COMFYUI_PYTHON tests/hosts/comfyui/parity_probe.py CHECKPOINT DATA_DIR OUT_DIR
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
from keys_probe import load_pack  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402

# name -> config changes; every run: 2 steps, batch 2, rank 4, seed 7, 64 px
RUNS = {"sd15_unet_snr_offset": dict(min_snr_gamma=5.0, noise_offset=0.05),
        "sd15_te_gc": dict(train_text_encoder=True, gradient_checkpointing=True, min_snr_gamma=0.0)}


def main(checkpoint, data, out):
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args

    args.cpu = True
    import torch

    import comfy.sd
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_fixture", os.path.join(REPO, "tests", "parity_fixture.py"))
    parity = importlib.util.module_from_spec(spec)  # by path: ComfyUI's folder has a `tests` package too
    spec.loader.exec_module(parity)

    pack = load_pack()
    from inplace_pack.engine.config import TrainConfig
    from inplace_pack.engine.lora.kohya_io import read_lora
    import inplace_pack.engine.train as train_module
    from inplace_pack.nodes.comfy_adapter import ComfyModel

    with torch.inference_mode():  # as ComfyUI runs nodes: the loaded weights are inference tensors
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    records = {"current": {}, "old_noise_seed": {}}
    noise_seed = train_module.noise_seed
    for kind, seeding in (("current", noise_seed), ("old_noise_seed", parity.seed_as_noise_seed)):
        train_module.noise_seed = seeding
        for name, changes in RUNS.items():
            cfg = TrainConfig(train_data_dir=data, output_dir=os.path.join(out, kind, name), output_name="t",
                              resolution="64", batch_size=2, max_train_steps=2, lora_rank=4, learning_rate=1e-3,
                              seed=7, save_every_n_epochs=0, save_precision="fp32", lr_scheduler="cosine",
                              warmup_steps=1, **changes)
            with parity.one_thread(), torch.inference_mode(False), torch.enable_grad():
                result = train_module.train(cfg, ComfyModel(model, clip, vae, name="sd15_random.safetensors"))
            tensors, metadata = read_lora(result.lora_path)
            records[kind][name] = parity.result_record(result.losses, tensors, metadata)
    train_module.noise_seed = noise_seed
    print(json.dumps(records))


if __name__ == "__main__":
    main(*sys.argv[1:4])
