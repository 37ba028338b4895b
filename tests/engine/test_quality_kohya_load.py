"""bench/quality_kohya.py hands kohya's train_network the demo model itself: run in kohya's own Python
(KOHYA_PYTHON, whose older transformers reads our transformers' text-encoder file differently), its text
encoder gives the demo's conditioning for a training caption, and its UNet and VAE hold the demo's
weights. Before this was checked, kohya trained on a randomly initialised text encoder without failing.
Needs a kohya sd-scripts environment (bench/README.md: KOHYA_PYTHON); collected only where KOHYA_PYTHON is set
(tests/conftest.py), so CI, which has none, neither runs it nor counts it as skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.quality_runs import _pipeline_folder

ROOT = Path(__file__).resolve().parents[2]
KOHYA_PYTHON = os.environ.get("KOHYA_PYTHON", "")

PROBE = """
import json, sys, torch
from transformers import CLIPTokenizer
sys.path.insert(0, sys.argv[1])
from quality_kohya import demo_parts
text_encoder, vae, unet = demo_parts(sys.argv[2])
tokenizer = CLIPTokenizer.from_pretrained(sys.argv[3])
ids = tokenizer(sys.argv[4], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                return_tensors="pt").input_ids
with torch.no_grad():
    context = text_encoder(ids)[0]
torch.save(context, sys.argv[5])
print(json.dumps({name: sum(float(p.double().sum()) for p in m.state_dict().values()) for name, m in
                  (("unet", unet), ("vae", vae))}))
"""


def test_kohya_gets_the_demo_models_weights_and_conditioning(tmp_path):
    from engine.models.demo_model import demo_model

    folder = _pipeline_folder(tmp_path)
    caption = "a red circle with ohwx stripes on a white background"
    out = subprocess.run([KOHYA_PYTHON, "-c", PROBE, str(ROOT / "bench"), str(folder),
                          str(tmp_path / "tokenizers" / "openai_clip-vit-large-patch14"), caption,
                          str(tmp_path / "context.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = json.loads(out.stdout.strip().splitlines()[-1])
    model = demo_model()
    assert torch.equal(torch.load(tmp_path / "context.pt"), model.encode_text([caption])["context"])
    for name, module in (("unet", model.unet), ("vae", model.vae)):
        assert sums[name] == sum(float(p.double().sum()) for p in module.state_dict().values())
