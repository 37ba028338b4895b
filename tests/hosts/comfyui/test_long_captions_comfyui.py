"""max_token_length 150 inside ComfyUI: the adapter encodes captions in two of ComfyUI's own 77-token
chunks, so tags after token 75 reach the model; with 75 they are cut, as kohya does by default."""
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tags_after_75_tokens_reach_the_model_only_with_max_token_length_150(comfy_python, sd15_checkpoint):
    out = subprocess.run([comfy_python, os.path.join(HERE, "long_caption_probe.py"), sd15_checkpoint],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    one, two = result["1"], result["2"]
    assert one["shape"] == [3, 77, 768] and not one["tail_reaches_model"]
    assert two["shape"] == [3, 154, 768] and two["tail_reaches_model"]
    # a short caption's first chunk is the same either way (the second is the empty prompt's)
    assert one["short_caption_first_chunk"] == two["short_caption_first_chunk"]
