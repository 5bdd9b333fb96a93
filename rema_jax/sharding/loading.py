"""Sharded loading: every checkpoint tensor goes straight into its sharded global array.

Tensors are read one at a time (as the loaders always do); each is sliced on the host into the
blocks of this process's devices (`jax.make_array_from_callback`), so no device ever holds more
than its shard and the host holds one full tensor at a time, never the whole model.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from rema_jax.models.config import CheckpointError, ModelConfig
from rema_jax.models.hub import SMOLLM2_NAME, LoadedModel, ModelSourceError, smollm2_gguf_path
from rema_jax.sharding.rules import DEFAULT_RULES, Rules, ShardingPlan


def make_placer(plan: ShardingPlan):
    """A loader `place(path, value, dtype)` hook that builds the sharded array of `path` under `plan`."""

    def place(path: tuple[str, ...], value: Any, dtype: Any) -> jax.Array:
        host = np.asarray(value)
        sharding = plan._named(plan.leaf_spec(tuple(path), host.shape))
        np_dtype = np.dtype(jax.numpy.dtype(dtype))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.asarray(host[idx], np_dtype))

    return place


def load_sharded(
    source: str | pathlib.Path,
    mesh: Mesh,
    *,
    rules: Rules = DEFAULT_RULES,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    with_tokenizer: bool = True,
) -> tuple[LoadedModel, ShardingPlan]:
    """Like `rema_jax.models.load` for a local HF dir, a `.gguf` file or `"smollm2-135m"`, but the
    params come back as sharded global arrays laid out by `rules` over `mesh`. Returns the loaded
    model and the `ShardingPlan` (reuse it for adapters, optimizer state and batches)."""
    from rema_jax.models.gguf_loader import load_gguf_params, open_gguf
    from rema_jax.models.hf_loader import load_hf_params, read_config
    from rema_jax.models.tokenizer import load_tokenizer

    src = str(source)
    path = smollm2_gguf_path() if src == SMOLLM2_NAME else pathlib.Path(src).expanduser()
    if path.is_dir():
        config = read_config(path, dtype=dtype, param_dtype=param_dtype)
        plan = ShardingPlan(mesh, config, rules)
        params = load_hf_params(path, config, place=make_placer(plan))
        tokenizer = load_tokenizer(path) if with_tokenizer else None
    elif path.suffix == ".gguf":
        reader = open_gguf(path)
        config = ModelConfig.from_gguf_metadata(reader, source=str(path), dtype=dtype, param_dtype=param_dtype)
        plan = ShardingPlan(mesh, config, rules)
        params = load_gguf_params(reader, config, str(path), place=make_placer(plan))
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name) if with_tokenizer else None
    elif path.exists():
        raise ModelSourceError(f"{path}: not a checkpoint directory or a .gguf file")
    else:
        raise CheckpointError(
            f"{src!r}: load_sharded needs a local HF checkpoint directory, a .gguf file or "
            f"{SMOLLM2_NAME!r} (download hub models first, then pass the directory)"
        )
    return LoadedModel(config, params, tokenizer, src), plan
