"""Export: an agent's merged weights as a HF checkpoint dir, and adapters alone (save/load).

`export_hf` folds the agent's adapter into the base (`merge_adapter`) and writes `model.safetensors`
(HF names, kernels back to [out, in]), `config.json` and, if given, the tokenizer files, so that
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it. `save_adapter`/`load_adapter`
store just one agent's adapter tree (`adapter.safetensors`) plus its static fields
(`adapter_config.json`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from rema_jax.models.adapters import ADAPTER_KINDS, Adapter, merge_adapter
from rema_jax.models.config import CheckpointError, ModelConfig
from rema_jax.models.hf_loader import path_to_hf_name
from rema_jax.models.layers import Params
from rema_jax.models.transformer import param_shapes

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "rema_jax.adapter/1"
_SEP = "/"


def _paths(tree: Params) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree.flatten_with_path(tree)[0]]


def hf_state_dict(config: ModelConfig, params: Params, dtype: Optional[str] = None) -> dict[str, jnp.ndarray]:
    """Contract-1 params → HF state dict (`[out, in]` weights), cast to `dtype` (default: param dtype)."""
    shapes = dict(_paths_of_shapes(param_shapes(config)))
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    state: dict[str, jnp.ndarray] = {}
    for path, leaf in _paths(params):
        if shapes.get(path) != tuple(leaf.shape):
            raise ValueError(f"params {'/'.join(path)} has shape {tuple(leaf.shape)}, expected {shapes.get(path)}")
        value = leaf.T if path[-1] == "kernel" else leaf
        state[path_to_hf_name(path)] = jnp.asarray(value, out_dtype)
    missing = sorted(set(shapes) - {p for p, _ in _paths(params)})
    if missing:
        raise ValueError(f"params lack {'/'.join(missing[0])}")
    return state


def _paths_of_shapes(shapes: Params) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    leaves = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in leaves]


def export_hf(
    directory: str | pathlib.Path,
    config: ModelConfig,
    params: Params,
    adapter: Optional[Adapter] = None,
    tokenizer: Any = None,
    dtype: Optional[str] = None,
) -> pathlib.Path:
    """Writes the agent's merged weights as a HF checkpoint dir that `transformers` loads."""
    from safetensors.flax import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = merge_adapter(params, adapter)
    dtype = dtype or config.param_dtype
    save_file(hf_state_dict(config, merged, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf_dict()
    hf_config.update(torch_dtype=dtype, dtype=dtype)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": hf_config["eos_token_id"],
        "pad_token_id": config.pad_token_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def save_adapter(directory: str | pathlib.Path, adapter: Adapter) -> pathlib.Path:
    """Writes one agent's adapter: `adapter.safetensors` (flattened tree) + `adapter_config.json`."""
    from safetensors.flax import save_file

    if not isinstance(adapter, Adapter):
        raise TypeError(f"save_adapter needs an Adapter (the 'shared' mode has nothing to save), got {type(adapter)}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {_SEP.join(path): jnp.asarray(leaf) for path, leaf in _paths(adapter.weights)}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    meta = {"format": ADAPTER_FORMAT, "kind": adapter.kind, "scale": float(adapter.scale)}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def load_adapter(directory: str | pathlib.Path) -> Adapter:
    """Reads an adapter written by `save_adapter` (errors name the file and the tensor)."""
    from safetensors import SafetensorError, safe_open

    directory = pathlib.Path(directory)
    meta_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (meta_path, weights_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: adapter file not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind, scale = meta["kind"], float(meta["scale"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: invalid adapter config (needs 'kind' and 'scale'): {e!r}") from None
    if meta.get("format") != ADAPTER_FORMAT or kind not in ADAPTER_KINDS or kind == "shared":
        raise CheckpointError(f"{meta_path}: unsupported adapter format {meta.get('format')!r} / kind {kind!r}")
    tree: dict[str, Any] = {}
    try:
        with safe_open(str(weights_path), framework="flax") as handle:
            for name in handle.keys():
                node = tree
                *parents, leaf = name.split(_SEP)
                for key in parents:
                    node = node.setdefault(key, {})
                try:
                    node[leaf] = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{weights_path}: tensor {name!r} cannot be read: {e}") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: cannot read safetensors file (corrupt or truncated?): {e}") from None
    if kind == "lora":
        for path, _ in _paths(tree):
            if path[-1] not in ("lora_a", "lora_b"):
                raise CheckpointError(f"{weights_path}: tensor {_SEP.join(path)!r} is not a LoRA factor")
    return Adapter(weights=tree, kind=kind, scale=scale)


__all__ = ["export_hf", "hf_state_dict", "save_adapter", "load_adapter"]
