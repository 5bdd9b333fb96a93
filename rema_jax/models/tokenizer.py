"""Tokenizers via `transformers.AutoTokenizer` (from a checkpoint dir or from a GGUF file)."""

from __future__ import annotations

import copy
import functools
import pathlib
from typing import Any

from rema_jax.models.config import CheckpointError


def load_tokenizer(directory: str | pathlib.Path, gguf_file: str | None = None) -> Any:
    """The HF tokenizer (with its chat template) of a checkpoint dir, or of `directory/gguf_file`.

    Offline-safe: only local files are read. Building it from a GGUF file converts the vocabulary and
    merges (4-6 s for SmolLM2 on a 2-core CPU) and a run builds it once per stage (SFT, RL, evals),
    so the converted tokenizer is kept per process, keyed by the file's path, size and mtime, and each
    call returns its own deep copy (~0.1 s): callers may still mutate what they get.
    """
    directory = pathlib.Path(directory)
    source = directory / gguf_file if gguf_file else directory / "tokenizer.json"
    try:
        stat = source.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None  # let transformers report what is missing
    return copy.deepcopy(_load_once(str(directory.resolve()), gguf_file, stamp))


@functools.lru_cache(maxsize=4)
def _load_once(directory: str, gguf_file: str | None, stamp: tuple[int, int] | None) -> Any:
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
