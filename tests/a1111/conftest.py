"""Fixtures for the A1111 extension tests: a fake WebUI (fake_webui.py), tiny A1111-shaped models
(fake_models.py) and a small captioned dataset in a folder whose name has spaces and CJK characters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import fake_webui  # noqa: E402


@pytest.fixture
def webui(monkeypatch, tmp_path):
    return fake_webui.install(monkeypatch, tmp_path / "webui")


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Four 64 px striped images with captions."""
    folder = tmp_path / "my data 数据"
    folder.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    for i in range(4):
        arr = np.stack([np.sin(x / (3 + i)) * 127 + 128, np.cos(y / (4 + i)) * 127 + 128,
                        np.full((64, 64), 60 * i)], -1).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes {i}, (pattern)", encoding="utf-8")
    return folder
