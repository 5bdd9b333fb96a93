"""Transformer layer math shared by the training forward and the sampler.

`rema_jax.models.transformer` (Linen modules, separate projections, LoRA) and
`rema_jax.sampling.kernel` (fused weights, prefill, decode) both call these functions for the
norms, the rotary embedding, attention and the gated MLP, so a model change is made here once.
They take plain arrays and never the sampler's fused records; this module imports only the
config and `rope`, so it sits below both (no import loop).

The one KV-cache layout is `KVCache`: per layer keys `k [B, kv_heads, head_dim, C]` (transposed) and
values `v [B, kv_heads, C, head_dim]`, so both products of a decode step are plain matmuls with no
operand transpose. The memory plan sizes it with `kv_cache_shapes`.
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
    "RAGGED_BLOCK",
    "rms_norm",
    "rope_cos_sin",
    "apply_rope_cos_sin",
    "qkv_heads",
    "dot_product_attention",
    "decode_attention",
    "mlp_hidden",
    "KVCache",
    "kv_cache_shapes",
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

# Slots per block of the ragged decode attention (a multiple of the usual cache buckets).
RAGGED_BLOCK = 128


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
    q_bthd: jnp.ndarray,
    k_bskd: jnp.ndarray,
    v_bskd: jnp.ndarray,
    mask_bts: jnp.ndarray,
    implementation: str = "reference",
) -> jnp.ndarray:
    """Grouped-query attention of a block of queries (training forward, prefill); `[B, T, heads, hd]`.

    `mask_bts` is True where query t may attend key s. A query row with no allowed key (a pad slot)
    gets a finite output, never NaN; it is meaningless and must be ignored by the caller.

    `implementation` (`ModelConfig.attention_impl`):
      - `reference`: the einsum path below; float32 scores and softmax, probabilities cast to q's
        dtype. Every test and the golden metrics are recorded with it.
      - `xla` / `cudnn`: `jax.nn.dot_product_attention` with that implementation. `cudnn` is the
        fused flash-attention kernel on NVIDIA GPUs (bf16/fp16 only); `xla` is jax's own composition,
        the fallback on every backend. Same math; results differ from `reference` in rounding only.
    """
    if implementation == "reference":
        return _reference_attention(q_bthd, k_bskd, v_bskd, mask_bts)
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation {implementation!r}; expected reference, xla or cudnn")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs an NVIDIA GPU (the default backend is {jax.default_backend()!r}); "
            "use 'xla' or 'reference'"
        )
    out = jax.nn.dot_product_attention(
        q_bthd,
        k_bskd.astype(q_bthd.dtype),
        v_bskd.astype(q_bthd.dtype),
        mask=mask_bts[:, None, :, :],
        implementation=implementation,
    )
    return out.astype(q_bthd.dtype)


def _reference_attention(q_bthd, k_bskd, v_bskd, mask_bts):
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(q.dtype), preferred_element_type=jnp.float32) * (d**-0.5)
    probs = _masked_probs(scores, mask_bts[:, None, None, :, :], q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(q.dtype))
    return out.reshape(b, t, h, d)


def decode_attention(
    q_bhd: jnp.ndarray,
    cache: "KVCache",
    mask_bc: jnp.ndarray,
    implementation: str = "dense",
    filled=None,
    block: int = RAGGED_BLOCK,
) -> jnp.ndarray:
    """One query per row `q_bhd [B, heads, hd]` against a `KVCache` (`mask_bc [B, C]`: attendable
    slots); `[B, heads, hd]`. Same math as `dot_product_attention`, contracted in the cache layout.

    `implementation` (`ModelConfig.decode_attention_impl`):
      - `dense`: scores against all C slots, masked (reads the whole cache every step).
      - `ragged`: reads only the slots `[0, filled)` (`filled`, a traced int: the slots written so
        far, the same for every row), in blocks of `block` slots with an online softmax
        (flash-decoding): running max m, normaliser l and output acc per query,
            m' = max(m, max_c s_c),  l' = l e^{m - m'} + sum_c e^{s_c - m'},
            acc' = acc e^{m - m'} + sum_c e^{s_c - m'} v_c,  out = acc / l.
        A decode step's cost then grows with the tokens generated so far instead of the cache length.
        Requires `C % block == 0` (else `block` shrinks to the largest divisor of C up to it).
    """
    if implementation == "dense":
        return _dense_decode_attention(q_bhd, cache, mask_bc)
    if implementation != "ragged":
        raise ValueError(f"decode attention implementation {implementation!r}; expected dense or ragged")
    c = cache.v.shape[2]
    return _ragged_decode_attention(q_bhd, cache, mask_bc, c if filled is None else filled, _divisor_block(c, block))


def _dense_decode_attention(q_bhd, cache, mask_bc):
    b, h, d = q_bhd.shape
    kv = cache.k.shape[1]
    q = q_bhd.reshape(b, kv, h // kv, d)
    scores = jnp.einsum("bkgd,bkdc->bkgc", q, cache.k.astype(q.dtype), preferred_element_type=jnp.float32) * (d**-0.5)
    probs = _masked_probs(scores, mask_bc[:, None, None, :], q.dtype)
    out = jnp.einsum("bkgc,bkcd->bkgd", probs, cache.v.astype(q.dtype))
    return out.reshape(b, h, d)


def _divisor_block(c: int, block: int) -> int:
    block = max(1, min(block, c))
    while c % block:
        block -= 1
    return block


def _ragged_decode_attention(q_bhd, cache, mask_bc, filled, block: int):
    b, h, d = q_bhd.shape
    kv = cache.k.shape[1]
    q = q_bhd.reshape(b, kv, h // kv, d)
    n_blocks = jnp.maximum((jnp.asarray(filled, jnp.int32) + block - 1) // block, 1)

    def body(i, carry):
        m, l, acc = carry
        start = i * block
        k = jax.lax.dynamic_slice_in_dim(cache.k, start, block, axis=3).astype(q.dtype)
        v = jax.lax.dynamic_slice_in_dim(cache.v, start, block, axis=2).astype(q.dtype)
        allowed = jax.lax.dynamic_slice_in_dim(mask_bc, start, block, axis=1)[:, None, None, :]
        s = jnp.einsum("bkgd,bkdc->bkgc", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
        s = jnp.where(allowed, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgc,bkcd->bkgd", p.astype(q.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    g = h // kv
    init = (
        jnp.full((b, kv, g), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, g), jnp.float32),
        jnp.zeros((b, kv, g, d), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return (acc / l[..., None]).astype(q.dtype).reshape(b, h, d)


def mlp_hidden(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """The gated MLP's hidden activation (SwiGLU) from the gate and up projections; the caller
    applies the down projection."""
    return jax.nn.silu(gate) * up


# ---------------------------------------------------------------------------- the KV cache record
class KVCache(NamedTuple):
    """One layer's cache in the compute dtype: rotated keys stored transposed, `k [B, kv_heads,
    head_dim, C]`, and values `v [B, kv_heads, C, head_dim]`.

    With these layouts a decode step's scores are `[g, hd] x [hd, C]` and its output `[g, C] x [C, hd]`
    per (row, kv head): plain matmuls, neither operand transposed. Keys stored like the values made
    XLA:CPU contract `[g, hd] x [C, hd]^T`, which cost a SmolLM2 decode step at batch 32 about 25 ms
    of its ~135 (a decode-step breakdown, docs/architecture.md)."""

    k: jnp.ndarray
    v: jnp.ndarray


def kv_cache_shapes(config: ModelConfig, batch: int, length: int) -> KVCache:
    """Shapes of `KVCache.k` `[B, kv, hd, C]` and `.v` `[B, kv, C, hd]` for `batch` rows and `length` slots."""
    kv, hd = config.num_kv_heads, config.head_dim
    return KVCache(k=(batch, kv, hd, length), v=(batch, kv, length, hd))


def kv_cache_dtype(config: ModelConfig) -> Any:
    """dtype of the cache: the compute dtype (keys/values are stored as computed)."""
    return jnp.dtype(config.compute_dtype)


def init_kv_cache(config: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
    """An all-zero cache, one `KVCache` per layer."""
    shapes, dtype = kv_cache_shapes(config, batch, length), kv_cache_dtype(config)
    return tuple(KVCache(jnp.zeros(shapes.k, dtype), jnp.zeros(shapes.v, dtype)) for _ in range(config.num_layers))


def kv_cache_from_block(k_btkd: jnp.ndarray, v_btkd: jnp.ndarray, length: int) -> KVCache:
    """A cache of `length` slots holding a block's keys/values `[B, T, kv, hd]` in slots `[0, T)`."""
    fill = length - k_btkd.shape[1]
    k = jnp.pad(k_btkd.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, fill)))
    return KVCache(k=k, v=jnp.pad(v_btkd.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, fill), (0, 0))))


def kv_cache_write(cache: KVCache, k_b1kd: jnp.ndarray, v_b1kd: jnp.ndarray, slot) -> KVCache:
    """`cache` with one token's keys/values `[B, 1, kv, hd]` written at `slot` (traced int)."""
    k = jax.lax.dynamic_update_slice(cache.k, k_b1kd.transpose(0, 2, 3, 1).astype(cache.k.dtype), (0, 0, 0, slot))
    v = jax.lax.dynamic_update_slice(cache.v, v_b1kd.transpose(0, 2, 1, 3).astype(cache.v.dtype), (0, 0, slot, 0))
    return KVCache(k, v)
