"""Nothing is fetched from a model hub at run time: a path that does not exist, or a bare Hugging Face id
given where a path belongs, ends in an error that says which file or folder to put where, with the
network blocked (a hub call would fail differently); files in the local Hugging Face cache still load."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from engine.config import TrainConfig
from engine.errors import ConfigError, ModelError, UserError

HUB_ID = "black-forest-labs/FLUX.1-dev"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every connection attempt fails the test; the Hugging Face cache is an empty folder."""
    import huggingface_hub.constants as hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


@pytest.mark.parametrize("value", [HUB_ID, "/no/such/folder/flux1-dev.safetensors", "models/sd15.safetensors"])
def test_a_base_model_that_is_not_there_is_named_before_anything_loads(tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(base_model=value, train_data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"base_model points to '.*', which does not exist") as caught:
        cfg.check_paths(need_base_model=True)
    assert ("looks like a Hugging Face id: nothing is downloaded" in str(caught.value)) is (value == HUB_ID)


def test_a_missing_relative_data_folder_is_only_missing(tmp_path, monkeypatch):
    """`data/cats` given for the images is a folder that is not there, not a model id to download."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"train_data_dir points to 'data/cats', which does not exist") as caught:
        TrainConfig(train_data_dir="data/cats").check_paths(need_base_model=False)
    assert "Hugging Face" not in str(caught.value)


@pytest.mark.parametrize("t5", [Path("/no/such/folder/t5xxl.safetensors"), Path(HUB_ID) / "t5xxl.safetensors"])
def test_a_missing_t5_tokenizer_says_where_to_put_it(t5):
    from engine.models.flux_load import t5_tokenizer

    with pytest.raises(ModelError, match=r"put tokenizer\.json or spiece\.model .* in " + str(t5.parent)):
        t5_tokenizer(t5)
    with pytest.raises(ModelError, match=r"t5xxl_tokenizer points to 'google/t5-v1_1-xxl', which does not exist"):
        t5_tokenizer(t5, given="google/t5-v1_1-xxl")


def test_the_t5_tokenizer_in_the_local_hugging_face_cache_still_loads(no_network, tmp_path):
    from engine.models.flux_load import t5_tokenizer
    from tests.engine.test_flux_cli import _write_tiny_text_encoders

    (tmp_path / "files").mkdir()
    _write_tiny_text_encoders(tmp_path / "files")
    snapshot = no_network / "models--google--t5-v1_1-xxl" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes((tmp_path / "files" / "t5_tokenizer.json").read_bytes())
    (no_network / "models--google--t5-v1_1-xxl" / "refs").mkdir()
    (no_network / "models--google--t5-v1_1-xxl" / "refs" / "main").write_text("abc123")
    tokenizer = t5_tokenizer(tmp_path / "elsewhere" / "t5xxl.safetensors")
    assert tokenizer("a b").input_ids


@pytest.mark.parametrize("value", [HUB_ID, "/no/such/model"])
def test_a_diffusers_part_or_text_model_that_is_not_there_is_not_a_hub_id(tmp_path, value):
    from diffusers import AutoencoderKL

    from engine.models.load import _from_pretrained
    from engine.text.model import check_model_folder

    with pytest.raises(ModelError, match=r"has no vae/config\.json: its VAE is missing\. Copy the model's whole vae/"):
        _from_pretrained(AutoencoderKL, Path(value) / "vae", "VAE")
    with pytest.raises(ModelError, match=r"which does not exist"):
        check_model_folder(value, trust_remote_code=False)


def test_a_text_adapter_that_is_not_there_is_not_a_hub_id(tmp_path):
    from types import SimpleNamespace

    from engine.text.model import attach_lora
    from engine.text.save import merge_adapter

    with pytest.raises(ModelError, match=r"is not a LoRA adapter folder: it needs adapter_config\.json"):
        attach_lora(None, SimpleNamespace(network_weights="someone/some-adapter"), seed=0)
    with pytest.raises(UserError, match=r"is not a LoRA adapter folder"):
        merge_adapter(tmp_path / "missing", tmp_path / "out", base=str(tmp_path))


def test_offline_switches_off_the_hub_client_that_is_already_imported():
    """HF_HUB_OFFLINE is read at import: setting the variable later alone would not stop a download."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from engine.text.model import offline

    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with offline():
        assert huggingface_hub.is_offline_mode()
        with pytest.raises(LocalEntryNotFoundError) as caught:  # not the blocked socket's AssertionError
            huggingface_hub.hf_hub_download(HUB_ID, "model_index.json")
        assert isinstance(caught.value.__cause__, OfflineModeIsEnabled)
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before
