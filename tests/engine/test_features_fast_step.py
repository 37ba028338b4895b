"""The training features of issue 19 on the CUDA-graph fast step: none of them makes it fall back
(`unsupported_reason`), and with all of them on it trains exactly like the plain step (run here without
the graph: everything the graph replays, on the CPU), validation loss included."""

import torch
from PIL import Image

from engine.config import TrainConfig
from engine.fast_step import unsupported_reason
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import FAST_ON_CPU, pattern_dataset, quick_config

ALL_ON = dict(multires_noise_iterations=4, ip_noise_gamma=0.1, caption_dropout_every_n_epochs=2,
              masked_loss=True, ema_decay=0.9, down_lr_weight="sine", mid_lr_weight="0.5", up_lr_weight="linear+.2",
              validation_split=0.3, validate_every_n_steps=2, validate_every_n_epochs=0)


def test_no_feature_sends_the_graph_step_to_the_plain_one():
    param = torch.nn.Parameter(torch.zeros(2))
    fused = torch.optim.AdamW([param], fused=True)
    cfg = TrainConfig(**ALL_ON)
    assert unsupported_reason(cfg, torch.device("cuda"), "bf16", fused, False) is None
    # tag dropout changes the captions every step: they are encoded on the host, so the plain step runs
    why = unsupported_reason(cfg.replace(caption_tag_dropout_rate=0.2), torch.device("cuda"), "bf16", fused, False)
    assert "caption_tag_dropout_rate" in why


def test_every_feature_at_once_trains_the_same_on_the_fast_step(tmp_path):
    data = pattern_dataset(tmp_path / "d", n=4)
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))
    mask.save(data / "img1_mask.png")
    plain = train(quick_config(data, tmp_path / "plain", max_train_steps=4, **ALL_ON), tiny_sd1())
    fast = train(quick_config(data, tmp_path / "fast", max_train_steps=4, **ALL_ON), tiny_sd1(), options=FAST_ON_CPU)
    assert fast.fast_steps == 4 and plain.fast_steps == 0
    close = lambda a, b: all(abs(x - y) <= 1e-5 * max(abs(x), abs(y), 1e-8) for x, y in zip(a, b))  # noqa: E731
    assert close(plain.losses, fast.losses), (plain.losses, fast.losses)
    assert [s for s, _ in plain.validation] == [s for s, _ in fast.validation] == [2, 4]
    assert close([v for _, v in plain.validation], [v for _, v in fast.validation])
    for key, value in plain.tensors.items():
        assert torch.allclose(value, fast.tensors[key], rtol=1e-4, atol=1e-6), key
