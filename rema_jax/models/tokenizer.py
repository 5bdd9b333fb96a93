"""Tokenizers via `transformers.AutoTokenizer` (from a checkpoint dir or from a GGUF file)."""

from __future__ import annotations

import pathlib
from typing import Any

from rema_jax.models.config import CheckpointError


def load_tokenizer(directory: str | pathlib.Path, gguf_file: str | None = None) -> Any:
    """The HF tokenizer (with its chat template) of a checkpoint dir, or of `directory/gguf_file`.

    Offline-safe: only local files are read.
    """
    from transformers import AutoTokenizer

    directory = pathlib.Path(directory)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        where = directory / gguf_file if gguf_file else directory
        raise CheckpointError(f"{where}: cannot load the tokenizer with transformers: {e}") from None
