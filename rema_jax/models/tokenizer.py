"""Tokenizers via `transformers` (from a checkpoint dir or from a GGUF file).

A GGUF file's tokenizer is converted by `transformers`' GGUF integration, which imports PyTorch
(~180 MiB of resident memory in a process that otherwise never uses it, plus the conversion's own
heap). So the conversion runs once in a child process that saves the result (`tokenizer.json`, the
chat template, the special tokens) under a per-user cache directory, keyed by the file's path, size,
mtime and the `transformers` version; every process then loads those files with
`PreTrainedTokenizerFast`, without PyTorch. `REMA_JAX_TOKENIZER_CACHE` names another directory, or
`off` to convert in-process as before; a cache that cannot be written falls back to that too.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from rema_jax.models.config import CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "REMA_JAX_TOKENIZER_CACHE"
_CONVERT = (
    "import sys; from transformers import AutoTokenizer; "
    "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2], local_files_only=True)"
    ".save_pretrained(sys.argv[3])"
)


def load_tokenizer(directory: str | pathlib.Path, gguf_file: str | None = None) -> Any:
    """The HF tokenizer (with its chat template) of a checkpoint dir, or of `directory/gguf_file`.

    Offline-safe: only local files are read. Building it from a GGUF file converts the vocabulary and
    merges (4-6 s for SmolLM2 on a 2-core CPU; once per file, see the module docstring), and a run
    builds it once per stage (SFT, RL, evals), so the tokenizer is kept per process, keyed by the
    file's path, size and mtime, and each call returns its own deep copy (~0.1 s): callers may still
    mutate what they get.
    """
    directory = pathlib.Path(directory)
    source = directory / gguf_file if gguf_file else directory / "tokenizer.json"
    try:
        stat = source.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None  # let transformers report what is missing
    cache = gguf_cache_dir(source, stamp) if gguf_file and stamp is not None else None
    return copy.deepcopy(_load_once(str(directory.resolve()), gguf_file, stamp, None if cache is None else str(cache)))


def gguf_cache_dir(source: pathlib.Path, stamp: tuple[int, int], environ=None) -> pathlib.Path | None:
    """Where the converted tokenizer of GGUF file `source` is kept (None: the cache is off)."""
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV_VAR)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    if value:
        base = pathlib.Path(value).expanduser()
    else:
        home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = pathlib.Path(home) / "rema_jax" / "tokenizers"
    import transformers

    key = repr((str(source.resolve()), stamp, transformers.__version__))
    return base.resolve() / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _convert_in_child(directory: pathlib.Path, gguf_file: str, target: pathlib.Path) -> bool:
    """Saves the GGUF file's tokenizer to `target` from a child process; atomic (a rename)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=".converting-")
    except OSError:
        return False
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CONVERT, str(directory), gguf_file, tmp],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode == 0 and os.path.exists(os.path.join(tmp, "tokenizer.json")):
            os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:  # e.g. another process renamed its copy there first
        log.debug("tokenizer conversion into %s: %s", target, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (target / "tokenizer.json").exists()


def _load_converted(target: pathlib.Path) -> Any | None:
    """The converted tokenizer saved in `target`, or None when it is unreadable (then the caller
    converts in-process)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring the damaged converted tokenizer in %s: %s", target, e)
        return None


@functools.lru_cache(maxsize=4)
def _load_once(directory: str, gguf_file: str | None, stamp: tuple[int, int] | None, cache: str | None) -> Any:
    directory = pathlib.Path(directory)
    if cache is not None and gguf_file is not None:
        target = pathlib.Path(cache)
        if (target / "tokenizer.json").exists() or _convert_in_child(directory, gguf_file, target):
            tokenizer = _load_converted(target)
            if tokenizer is not None:
                return tokenizer
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        where = directory / gguf_file if gguf_file else directory
        raise CheckpointError(f"{where}: cannot load the tokenizer with transformers: {e}") from None
