"""Saving into models/loras: names stay inside the folder, nothing is replaced silently, files are
complete, readable and carry the preview."""
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from inplace_lora_pack.engine.errors import UserError
from inplace_lora_pack.nodes.lora_files import check_name, prompt_tag, target_path, write_lora
from inplace_lora_pack.nodes.values import LoRAWeights


def weights(name="style"):
    t = {"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.float16),
         "lora_unet_x.lora_up.weight": torch.zeros(4, 2, dtype=torch.float16), "lora_unet_x.alpha": torch.tensor(1.0)}
    return LoRAWeights(name, t, {"ss_output_name": "run", "ss_network_dim": "2"}, preview=Image.new("RGB", (8, 8)))


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "C:\\loras\\x", "~/x", "", "  ", "a:b", "dot./x"])
def test_names_that_leave_the_folder_or_are_not_file_names_are_refused(name):
    with pytest.raises(UserError, match="name"):
        check_name(name)


def test_subfolders_and_unicode_names_are_fine(tmp_path):
    path = target_path(tmp_path, "styles/水彩 style")
    assert path == tmp_path / "styles" / "水彩 style.safetensors"
    assert target_path(tmp_path, "x.safetensors") == tmp_path / "x.safetensors"


def test_existing_files_get_a_numbered_name_unless_overwrite(tmp_path):
    first, rel = write_lora(tmp_path, "styles/ink", weights())
    assert rel == "styles/ink.safetensors"
    second, _ = write_lora(tmp_path, "styles/ink", weights())
    third, _ = write_lora(tmp_path, "styles/ink", weights())
    assert (second.name, third.name) == ("ink_2.safetensors", "ink_3.safetensors")
    again, _ = write_lora(tmp_path, "styles/ink", weights(), overwrite=True)
    assert again == first
    assert prompt_tag(second) == "<lora:ink_2:0.8>"


def test_written_file_is_a_readable_kohya_lora_with_its_preview(tmp_path):
    path, _ = write_lora(tmp_path, "ink", weights())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(weights().tensors)
    assert meta["ss_output_name"] == "ink" and meta["modelspec.title"] == "ink" and "sshs_model_hash" in meta
    assert (tmp_path / "ink.preview.png").is_file()
    assert os.stat(path).st_mode & 0o044, "other users cannot read the file"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
