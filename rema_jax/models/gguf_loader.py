"""GGUF files (llama.cpp) → params: dequantize with `gguf`, undo llama.cpp's Q/K row permutation.

llama.cpp's converter permutes the rows of Llama Q and K projections (per head, interleaving the two
rotary halves). We undo it exactly as transformers' own GGUF loader does, which makes the weights
equal to the HF state dict. Qwen2 GGUFs are not permuted.
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

import numpy as np

from rema_jax.models.config import CheckpointError, ModelConfig
from rema_jax.models.hf_loader import Placer, assign_tensor, check_complete
from rema_jax.models.layers import Params
from rema_jax.models.transformer import param_shapes

_GLOBAL = {
    "token_embd.weight": (("embed_tokens", "embedding"), False),
    "output_norm.weight": (("norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}
_BLOCK = {
    "attn_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_name_to_path(name: str) -> Optional[tuple[tuple[str, ...], bool]]:
    """GGUF tensor name → (Contract-1 path, transpose?) or None for unknown names."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in _BLOCK:
        return None
    layer, part, kind = m.groups()
    module = _BLOCK[part]
    if len(module) == 1:
        return ((f"layers_{layer}", module[0], "scale"), False) if kind == "weight" else None
    return (f"layers_{layer}", *module, "kernel" if kind == "weight" else "bias"), kind == "weight"


def path_to_gguf_name(path: tuple[str, ...]) -> str:
    for name, (p, _) in _GLOBAL.items():
        if p == path:
            return name
    layer = path[0].removeprefix("layers_")
    module = path[1:2] if path[-1] == "scale" else path[1:3]
    part = next(k for k, v in _BLOCK.items() if v == tuple(module))
    return f"blk.{layer}.{part}.{'bias' if path[-1] == 'bias' else 'weight'}"


def reverse_llama_permute(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation of a `[out, ...]` weight (or bias)."""
    dim = w_out_in.shape[0] // n_heads // 2
    w = w_out_in.reshape(n_heads, dim, 2, *w_out_in.shape[1:])
    return w.swapaxes(2, 1).reshape(w_out_in.shape)


def open_gguf(path: str | pathlib.Path):
    """A `gguf.GGUFReader`, with unreadable files reported as `CheckpointError`."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(
            f"{path}: cannot read GGUF file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from None


def load_gguf_params(reader, config: ModelConfig, source: str, *, place: Optional[Placer] = None) -> Params:
    """Dequantizes every tensor of `reader` into a Contract-1 tree for `config` (`place`: see
    `hf_loader.assign_tensor`)."""
    import gguf

    shapes = param_shapes(config)
    params: Params = {}
    permute = config.family == "llama"
    for t in reader.tensors:
        mapped = gguf_name_to_path(t.name)
        if mapped is None:
            raise CheckpointError(f"{source}: unknown tensor name {t.name!r} in GGUF file")
        path, transpose = mapped
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(
                f"{source}: tensor {t.name!r} ({t.tensor_type.name}) cannot be dequantized: {type(e).__name__}: {e}"
            ) from None
        expected_rows = int(np.prod([int(x) for x in t.shape[1:]])) if len(t.shape) > 1 else None
        if expected_rows is not None and w.ndim == 2 and w.shape[0] != expected_rows:
            raise CheckpointError(
                f"{source}: tensor {t.name!r} data shape {w.shape} disagrees with its header "
                f"{tuple(int(x) for x in t.shape)}"
            )
        if permute and path[-2] in ("q_proj", "k_proj"):
            w = reverse_llama_permute(w, config.num_heads if path[-2] == "q_proj" else config.num_kv_heads)
        if transpose:
            w = w.T
        assign_tensor(params, shapes, path, w, file=source, name=t.name, param_dtype=config.params_dtype, place=place)
    check_complete(params, shapes, source, path_to_gguf_name)
    return params


def load_gguf(
    path: str | pathlib.Path, dtype: str = "float32", param_dtype: Optional[str] = None
) -> tuple[ModelConfig, Params]:
    """(config, params) of a GGUF file."""
    reader = open_gguf(path)
    config = ModelConfig.from_gguf_metadata(reader, source=str(path), dtype=dtype, param_dtype=param_dtype)
    return config, load_gguf_params(reader, config, str(path))
