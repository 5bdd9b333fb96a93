"""Token selection: greedy, temperature, top-k, top-p, with the log-prob of the chosen token.

The unfiltered path samples by inverse CDF in two levels (blocks of the vocabulary, then within the
chosen block) from one uniform number per row: it needs a single `exp` pass over the logits (the one
the log-partition needs anyway) instead of a full-vocabulary Gumbel draw, which costs a PRNG call and
two logs per vocabulary entry per row per step. Filtered paths (top-k / top-p) sort only the
candidates. Every path returns the log-prob of the sampled token under the distribution it was
actually drawn from.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_BLOCK = 256  # vocabulary block size of the two-level inverse CDF


class SamplingMode(NamedTuple):
    """The static (shape- or branch-determining) part of the sampling controls."""

    greedy: bool
    top_k: int  # 0 = off
    use_top_p: bool


def _count_le(cum_bn: jnp.ndarray, target_b: jnp.ndarray) -> jnp.ndarray:
    """Number of entries of the non-decreasing `cum_bn` that are <= target (= inverse-CDF index)."""
    return jnp.sum((cum_bn <= target_b[:, None]).astype(jnp.int32), axis=-1)


def _sample_full(x_bv: jnp.ndarray, u_b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Exact categorical sample from softmax(x) over the whole vocabulary, two-level inverse CDF."""
    b, v = x_bv.shape
    m_b = jnp.max(x_bv, axis=-1)
    e_bv = jnp.exp(x_bv - m_b[:, None])
    nb = -(-v // _BLOCK)
    if nb * _BLOCK != v:
        e_bv = jnp.pad(e_bv, ((0, 0), (0, nb * _BLOCK - v)))
    e_bnk = e_bv.reshape(b, nb, _BLOCK)
    s_bn = jnp.sum(e_bnk, axis=-1)
    cs_bn = jnp.cumsum(s_bn, axis=-1)
    z_b = cs_bn[:, -1]
    target_b = u_b * z_b
    blk_b = jnp.minimum(_count_le(cs_bn, target_b), nb - 1)
    # Skip empty blocks a rounding error could land in: fall back to the heaviest block.
    s_sel = jnp.take_along_axis(s_bn, blk_b[:, None], axis=-1)[:, 0]
    blk_b = jnp.where(s_sel > 0, blk_b, jnp.argmax(s_bn, axis=-1))
    e_bk = jnp.take_along_axis(e_bnk, blk_b[:, None, None], axis=1)[:, 0]
    prefix_b = jnp.take_along_axis(cs_bn - s_bn, blk_b[:, None], axis=-1)[:, 0]
    idx_b = jnp.minimum(_count_le(jnp.cumsum(e_bk, axis=-1), target_b - prefix_b), _BLOCK - 1)
    e_sel = jnp.take_along_axis(e_bk, idx_b[:, None], axis=-1)[:, 0]
    idx_b = jnp.where(e_sel > 0, idx_b, jnp.argmax(e_bk, axis=-1))
    tok_b = blk_b * _BLOCK + idx_b
    x_tok = jnp.take_along_axis(x_bv, tok_b[:, None], axis=-1)[:, 0]
    logp_b = x_tok - m_b - jnp.log(z_b)
    return tok_b.astype(jnp.int32), logp_b


def _sample_filtered(x_bv: jnp.ndarray, u_b: jnp.ndarray, top_k: int, top_p) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Top-k (k = `top_k`, or the whole vocabulary when 0) then top-p (`top_p` None = off) sampling.

    Top-p keeps the smallest prefix of the (top-k renormalised) sorted distribution whose mass
    reaches `top_p`, always at least one token, as `transformers`' warpers do.
    """
    k = top_k if top_k > 0 else x_bv.shape[-1]
    vals_bk, idx_bk = jax.lax.top_k(x_bv, k)
    logp_bk = jax.nn.log_softmax(vals_bk, axis=-1)
    if top_p is not None:
        p_bk = jnp.exp(logp_bk)
        keep_bk = (jnp.cumsum(p_bk, axis=-1) - p_bk) < top_p
        keep_bk = keep_bk.at[:, 0].set(True)
        logp_bk = jax.nn.log_softmax(jnp.where(keep_bk, vals_bk, -jnp.inf), axis=-1)
    p_bk = jnp.exp(logp_bk)
    cum_bk = jnp.cumsum(p_bk, axis=-1)
    pos_b = _count_le(cum_bk, u_b * cum_bk[:, -1])
    n_kept_b = jnp.sum((p_bk > 0).astype(jnp.int32), axis=-1)
    pos_b = jnp.minimum(pos_b, jnp.maximum(n_kept_b - 1, 0))
    tok_b = jnp.take_along_axis(idx_bk, pos_b[:, None], axis=-1)[:, 0]
    logp_b = jnp.take_along_axis(logp_bk, pos_b[:, None], axis=-1)[:, 0]
    return tok_b.astype(jnp.int32), logp_b


def sample_tokens(
    logits_bv: jnp.ndarray, u_b: jnp.ndarray, mode: SamplingMode, temperature, top_p
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Chooses one token per row; returns `(tokens_b int32, logprobs_b float32)`.

    Args:
      logits_bv: float32 logits `[B, V]`.
      u_b: uniform [0, 1) numbers, one per row (ignored when greedy).
      mode: static controls; `temperature` and `top_p` are traced scalars.
    Greedy returns argmax and its log-prob under the untempered model distribution.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    if mode.greedy:
        tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        lse_b = jax.nn.logsumexp(logits_bv, axis=-1)
        return tok_b, jnp.take_along_axis(logits_bv, tok_b[:, None], axis=-1)[:, 0] - lse_b
    x_bv = logits_bv / jnp.asarray(temperature, jnp.float32)
    if mode.top_k > 0 or mode.use_top_p:
        return _sample_filtered(x_bv, u_b, mode.top_k, top_p if mode.use_top_p else None)
    return _sample_full(x_bv, u_b)


def row_uniforms(keys_b: jax.Array, step) -> jnp.ndarray:
    """One uniform per row for decode step `step` from per-row keys (deterministic per row seed)."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(keys_b)
