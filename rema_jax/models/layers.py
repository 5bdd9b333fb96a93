"""Transformer layer math shared by the training forward and the sampler.

`rema_jax.models.transformer` (Linen modules, separate projections, LoRA) and
`rema_jax.sampling.kernel` (fused weights, prefill, decode) both call these functions for the
norms, the rotary embedding, attention and the gated MLP, so a model change is made here once.
They take plain arrays and never the sampler's fused records; this module imports only the
config and `rope`, so it sits below both (no import loop).

The one KV-cache layout is `KVCache`: per layer `k, v [B, kv_heads, C, head_dim]` (a decode step is
then a batched matmul over contiguous keys). The memory plan sizes it with `kv_cache_shape`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rema_jax.models.config import ModelConfig
from rema_jax.models.rope import apply_rope_cos_sin, rope_cos_sin

__all__ = [
    "Params",
    "ATTENTION_PROJS",
    "MLP_PROJS",
    "MASK_VALUE",
    "rms_norm",
    "rope_cos_sin",
    "apply_rope_cos_sin",
    "qkv_heads",
    "dot_product_attention",
    "decode_attention",
    "mlp_hidden",
    "KVCache",
    "kv_cache_shape",
    "kv_cache_dtype",
    "init_kv_cache",
    "kv_cache_from_block",
    "kv_cache_write",
]

Params = dict[str, Any]  # the parameter tree, named as HF names (Contract 1)

# Contract-1 projection names, by module ("self_attn", "mlp"). Here, not in transformer.py, so that
# adapters, loaders and the memory plan can name them without importing the model.
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")

# The score of a masked (query, key) pair. Finite, so a query row with no allowed key (a left-pad
# slot) gets a uniform distribution instead of NaN, and representable in bfloat16 too. exp() of it
# minus any real score is exactly 0, so a row with at least one allowed key ignores masked keys.
MASK_VALUE = -1e30


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF LlamaRMSNorm: normalise in float32, cast back to x's dtype, multiply by `scale`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def qkv_heads(
    config: ModelConfig, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Projected `q [B, T, nh*hd]`, `k`, `v [B, T, nkv*hd]` as heads `[B, T, heads, hd]`, with the
    rotary embedding (tables `[B, T, hd]` from `rope_cos_sin`) applied to q and k."""
    lead = q.shape[:-1]
    q = q.reshape(*lead, config.num_heads, config.head_dim)
    k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
    v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
    return apply_rope_cos_sin(q, cos_btd, sin_btd), apply_rope_cos_sin(k, cos_btd, sin_btd), v


def _masked_probs(scores: jnp.ndarray, mask: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Softmax over the last axis of float32 `scores` where `mask` (broadcast) is True, cast to `dtype`."""
    scores = jnp.where(mask, scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def dot_product_attention(
    q_bthd: jnp.ndarray, k_bskd: jnp.ndarray, v_bskd: jnp.ndarray, mask_bts: jnp.ndarray
) -> jnp.ndarray:
    """Grouped-query attention of a block of queries (training forward, prefill); `[B, T, heads, hd]`.

    `mask_bts` is True where query t may attend key s. Scores and softmax are float32. A query row
    with no allowed key (a pad slot) gets a uniform, finite distribution, never NaN; its output is
    meaningless and must be ignored by the caller.
    """
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(q.dtype), preferred_element_type=jnp.float32) * (d**-0.5)
    probs = _masked_probs(scores, mask_bts[:, None, None, :, :], q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(q.dtype))
    return out.reshape(b, t, h, d)


def decode_attention(q_bhd: jnp.ndarray, cache: "KVCache", mask_bc: jnp.ndarray) -> jnp.ndarray:
    """One query per row `q_bhd [B, heads, hd]` against a `KVCache` (`mask_bc [B, C]`: attendable
    slots); `[B, heads, hd]`. Same math as `dot_product_attention`, contracted in the cache layout."""
    b, h, d = q_bhd.shape
    kv = cache.k.shape[1]
    q = q_bhd.reshape(b, kv, h // kv, d)
    scores = jnp.einsum("bkgd,bkcd->bkgc", q, cache.k.astype(q.dtype), preferred_element_type=jnp.float32) * (d**-0.5)
    probs = _masked_probs(scores, mask_bc[:, None, None, :], q.dtype)
    out = jnp.einsum("bkgc,bkcd->bkgd", probs, cache.v.astype(q.dtype))
    return out.reshape(b, h, d)


def mlp_hidden(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """The gated MLP's hidden activation (SwiGLU) from the gate and up projections; the caller
    applies the down projection."""
    return jax.nn.silu(gate) * up


# ---------------------------------------------------------------------------- the KV cache record
class KVCache(NamedTuple):
    """One layer's keys (rotated) and values, `[B, kv_heads, C, head_dim]` each, in the compute dtype."""

    k: jnp.ndarray
    v: jnp.ndarray


def kv_cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    """Shape of `KVCache.k` (and `.v`) for `batch` rows and `length` slots."""
    return (batch, config.num_kv_heads, length, config.head_dim)


def kv_cache_dtype(config: ModelConfig) -> Any:
    """dtype of the cache: the compute dtype (keys/values are stored as computed)."""
    return jnp.dtype(config.compute_dtype)


def init_kv_cache(config: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
    """An all-zero cache, one `KVCache` per layer."""
    shape, dtype = kv_cache_shape(config, batch, length), kv_cache_dtype(config)
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def kv_cache_from_block(k_btkd: jnp.ndarray, v_btkd: jnp.ndarray, length: int) -> KVCache:
    """A cache of `length` slots holding a block's keys/values `[B, T, kv, hd]` in slots `[0, T)`."""
    pad = ((0, 0), (0, 0), (0, length - k_btkd.shape[1]), (0, 0))
    return KVCache(k=jnp.pad(k_btkd.transpose(0, 2, 1, 3), pad), v=jnp.pad(v_btkd.transpose(0, 2, 1, 3), pad))


def kv_cache_write(cache: KVCache, k_b1kd: jnp.ndarray, v_b1kd: jnp.ndarray, slot) -> KVCache:
    """`cache` with one token's keys/values `[B, 1, kv, hd]` written at `slot` (traced int)."""
    k = jax.lax.dynamic_update_slice(cache.k, k_b1kd.transpose(0, 2, 1, 3).astype(cache.k.dtype), (0, 0, slot, 0))
    v = jax.lax.dynamic_update_slice(cache.v, v_b1kd.transpose(0, 2, 1, 3).astype(cache.v.dtype), (0, 0, slot, 0))
    return KVCache(k, v)
