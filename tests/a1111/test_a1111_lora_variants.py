"""The A1111 tab trains LoHa, LoKr and DoRA: its Network knob trains each variant in place on the fake
WebUI's A1111-shaped SD1 model, and DoRA on A1111's weightless stand-ins is refused with what to do.
That A1111's own Lora extension reads the files right is a manual host check
(tests/hosts/a1111/check_a1111_lora_loader.py, needs an A1111 checkout; result in tests/hosts/README.md).
"""

from __future__ import annotations

import pytest
import torch

from engine.lora.variants import DoRAModule


@pytest.mark.parametrize("kind,key", [("lokr", ".lokr_w1"), ("dora", ".dora_scale")])
def test_the_tab_trains_a_variant_in_place(webui, dataset, kind, key):
    """What the tab's Network knob sends: the file lands in the Lora folder with LyCORIS' keys, text
    encoder included, and the loaded model is left as it was."""
    from fake_models import FakeSD1
    from fake_webui import load_model, quick_request
    from inplace_lora_a1111 import api, tab
    from inplace_lora_a1111.job import JobManager
    from safetensors import safe_open

    assert "network_type" in [k.field for k in tab.KNOBS]
    model = FakeSD1(webui.shared.opts)
    load_model(webui, model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    manager = JobManager()
    code, body = api.handle_train(quick_request(dataset, network_type=kind, train_text_encoder=True), manager)
    assert code == 200, body
    manager.job.thread.join(300)
    status = manager.status()
    assert status["status"] == "done" and status["error"] is None, status
    with safe_open(status["lora_file"], "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert any(k.startswith("lora_te_") and k.endswith(key) for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_dora_on_weightless_fused_attention_stand_ins_says_what_to_do():
    from engine.errors import ConfigError
    from inplace_lora_a1111.fused_attention import SliceProxy

    with pytest.raises(ConfigError, match="train_text_encoder off"):
        DoRAModule(SliceProxy(64, 64), 4, 2.0)
