"""Local HF checkpoint directories (`config.json` + `*.safetensors`, optionally sharded) → params.

Tensors are read one at a time with `safetensors.safe_open` and converted in place into the
Contract-1 tree (kernels transposed to [in, out], cast to `param_dtype`), so the host never holds a
second full copy of the checkpoint. Every tensor is checked against `param_shapes(config)`: unknown,
missing or mis-shaped tensors and unreadable files raise `CheckpointError` naming file and tensor.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Iterator, Optional

import jax.numpy as jnp

from rema_jax.models.config import CheckpointError, ModelConfig
from rema_jax.models.layers import ATTENTION_PROJS, MLP_PROJS, Params
from rema_jax.models.transformer import param_shapes

INDEX_FILE = "model.safetensors.index.json"
# (Contract-1 path, host value, param dtype) -> the array to store; see `assign_tensor`.
Placer = Callable[[tuple[str, ...], Any, Any], Any]
# Buffers some older checkpoints carry that are not parameters (recomputed from the config).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\.(?:(\w+)\.)?"
    r"(weight|bias)$"
)


def hf_name_to_path(name: str) -> Optional[tuple[tuple[str, ...], bool]]:
    """HF tensor name → (Contract-1 path, transpose?) or None when the name is not a model weight."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if name == "model.norm.weight":
        return ("norm", "scale"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    m = _LAYER.match(name)
    if not m:
        return None
    layer, module, proj, kind = m.groups()
    if module.endswith("layernorm"):
        return ((f"layers_{layer}", module, "scale"), False) if proj is None and kind == "weight" else None
    if proj not in (ATTENTION_PROJS if module == "self_attn" else MLP_PROJS):
        return None
    return (f"layers_{layer}", module, proj, "kernel" if kind == "weight" else "bias"), kind == "weight"


def path_to_hf_name(path: tuple[str, ...]) -> str:
    """Contract-1 path → HF tensor name (inverse of `hf_name_to_path`)."""
    if path == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if path == ("norm", "scale"):
        return "model.norm.weight"
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    layer = path[0].removeprefix("layers_")
    if path[-1] == "scale":
        return f"model.layers.{layer}.{path[1]}.weight"
    return f"model.layers.{layer}.{path[1]}.{path[2]}.{'weight' if path[3] == 'kernel' else 'bias'}"


def read_config(directory: pathlib.Path, dtype: str = "float32", param_dtype: Optional[str] = None) -> ModelConfig:
    """`ModelConfig` from `directory/config.json`."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found in the checkpoint directory {directory}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(d, source=str(path), dtype=dtype, param_dtype=param_dtype)


def _shard_files(directory: pathlib.Path) -> dict[pathlib.Path, list[str] | None]:
    """Safetensors files to read → the tensor names the index expects in each (None: unknown)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs 'weight_map'): {e!r}") from None
        files: dict[pathlib.Path, list[str] | None] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(directory / fname, []).append(tensor)
        for f, tensors in files.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index} (for tensor {tensors[0]!r}) is missing")
        return files
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(
            f"{directory}: no *.safetensors files (and no {INDEX_FILE}); only safetensors checkpoints are supported"
        )
    return {f: None for f in found}


def _iter_tensors(files: dict[pathlib.Path, list[str] | None]) -> Iterator[tuple[pathlib.Path, str, Any]]:
    from safetensors import SafetensorError, safe_open

    for f, expected in files.items():
        try:
            handle = safe_open(str(f), framework="flax")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file (corrupt or truncated?): {e}") from None
        with handle:
            names = list(handle.keys())
            if expected is not None:
                absent = sorted(set(expected) - set(names))
                if absent:
                    raise CheckpointError(f"{f}: tensor {absent[0]!r} listed in the index is not in this file")
            for name in names:
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{f}: tensor {name!r} cannot be read: {e}") from None
                yield f, name, tensor


def assign_tensor(
    params: Params,
    shapes: Params,
    path: tuple[str, ...],
    value: Any,
    *,
    file: Any,
    name: str,
    param_dtype: Any,
    place: Optional[Placer] = None,
) -> None:
    """Checks `value` against the expected shape at `path` and stores it (cast to `param_dtype`).

    `place(path, value, dtype) -> array`, when given, builds the stored array instead of
    `jnp.asarray` (e.g. straight into a sharded array, see `rema_jax.sharding.loading`).
    """
    node = shapes
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(
                f"{file}: tensor {name!r} is not a parameter of this architecture (no {'/'.join(path)})"
            )
        node = node[key]
    if tuple(value.shape) != tuple(node):
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(node)} for {'/'.join(path)}"
        )
    target = params
    for key in path[:-1]:
        target = target.setdefault(key, {})
    if path[-1] in target:
        raise CheckpointError(f"{file}: tensor {name!r} appears twice in the checkpoint")
    target[path[-1]] = jnp.asarray(value, dtype=param_dtype) if place is None else place(path, value, param_dtype)


def check_complete(params: Params, shapes: Params, source: Any, name_of) -> None:
    """Raises `CheckpointError` naming the first expected tensor that was not loaded."""

    def walk(shape_node, param_node, path):
        for key, sub in shape_node.items():
            if isinstance(sub, dict):
                walk(sub, (param_node or {}).get(key), path + (key,))
            elif param_node is None or key not in param_node:
                raise CheckpointError(f"{source}: tensor {name_of(path + (key,))!r} is missing from the checkpoint")

    walk(shapes, params, ())


def load_hf_params(directory: str | pathlib.Path, config: ModelConfig, *, place: Optional[Placer] = None) -> Params:
    """Reads all weights of a HF checkpoint directory into a Contract-1 tree for `config`
    (`place`: see `assign_tensor`)."""
    directory = pathlib.Path(directory)
    shapes = param_shapes(config)
    params: Params = {}
    files = _shard_files(directory)
    for f, name, tensor in _iter_tensors(files):
        if _IGNORED.match(name):
            continue
        mapped = hf_name_to_path(name)
        if mapped is None:
            raise CheckpointError(f"{f}: unknown tensor name {name!r} for a {config.family} checkpoint")
        path, transpose = mapped
        if path == ("lm_head", "kernel") and config.tie_word_embeddings:
            continue  # a tied checkpoint may still store lm_head.weight (= the embedding)
        if transpose:
            if tensor.ndim != 2:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(tensor.shape)}, expected a matrix")
            tensor = tensor.T
        assign_tensor(params, shapes, path, tensor, file=f, name=name, param_dtype=config.params_dtype, place=place)
        del tensor
    check_complete(params, shapes, directory, path_to_hf_name)
    return params


def load_hf_dir(
    directory: str | pathlib.Path, dtype: str = "float32", param_dtype: Optional[str] = None
) -> tuple[ModelConfig, Params]:
    """(config, params) of a local HF checkpoint directory."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = read_config(directory, dtype=dtype, param_dtype=param_dtype)
    return config, load_hf_params(directory, config)
