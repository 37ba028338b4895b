"""Run with the ComfyUI venv's python: our ComfyUI adapter's caption encoding with max_token_length
75 and 150, on the random SD1.5 checkpoint loaded by ComfyUI's own loader (CLIP only matters here).
Prints JSON: the conditioning shapes, and whether a difference after token 75 reaches the context.

    $COMFYUI_PYTHON tests/hosts/comfyui/long_caption_probe.py CHECKPOINT
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from keys_probe import load_pack  # noqa: E402
from make_checkpoint import comfy_root  # noqa: E402

TAGS = ", ".join(f"tag{i}" for i in range(25))  # 89 CLIP tokens


def main(checkpoint):
    sys.path.insert(0, comfy_root())
    from comfy.cli_args import args

    args.cpu = True
    load_pack()
    import torch

    import comfy.sd
    from inplace_pack.nodes.comfy_adapter import ComfyModel

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clipvision=False)
    adapter = ComfyModel(model, clip, vae, name="probe")
    captions = [TAGS + ", red hair", TAGS + ", blue hair", "a cat"]
    result = {}
    for windows in (1, 2):
        adapter.set_token_windows(windows)
        with torch.no_grad():
            context = adapter.encode_text(captions)["context"].float()
        result[str(windows)] = {"shape": list(context.shape),
                                "tail_reaches_model": not torch.allclose(context[0], context[1]),
                                "short_caption_first_chunk": context[2, :77].flatten()[:64].tolist()}
    adapter.set_token_windows(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
