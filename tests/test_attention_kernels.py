"""Selectable attention kernels (issue 15) against the reference paths, on CPU.

- Block attention (training forward, prefill): `ModelConfig.attention_impl` = `xla`
  (`jax.nn.dot_product_attention`) equals `reference` (the einsum path) in values and gradients,
  under causal + padding masks with grouped-query heads; `cudnn` off a GPU is a clear error.
- Decode attention: `decode_attention_impl = ragged` (only the filled slots, blocked online softmax)
  equals `dense` for every fill level around the block edges, with one compilation for all of them.
- End to end: the sampler's greedy tokens and log-probs and the training forward's logits are the
  same with the kernels switched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.models import forward, layers
from rema_jax.models.config import ModelConfigError
from rema_jax.models.testing import random_params, tiny_config


def _qkv(rng, b=2, t=7, s=7, h=4, kv=2, d=8):
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32)
    return q, k, v


def _causal_padded_mask(b, t, pad):
    slots = np.arange(t)
    real = slots[None, :] >= np.asarray(pad)[:, None]  # left padding
    return jnp.asarray((slots[:, None] >= slots[None, :])[None] & real[:, None, :]), real


def test_xla_block_attention_equals_reference_values_and_gradients():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    mask, real = _causal_padded_mask(2, 7, [0, 3])
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * jnp.asarray(real)[:, :, None, None]

    def loss(impl, q, k, v):  # only real query rows count: pad rows' outputs are meaningless
        return jnp.sum(layers.dot_product_attention(q, k, v, mask, impl) * w)

    ref = layers.dot_product_attention(q, k, v, mask, "reference")
    got = layers.dot_product_attention(q, k, v, mask, "xla")
    keep = np.asarray(real)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(ref)[keep], atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # pad rows too


def test_cudnn_off_a_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: cudnn is valid here")
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    mask, _ = _causal_padded_mask(2, 7, [0, 0])
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        layers.dot_product_attention(q, k, v, mask, "cudnn")


def test_unknown_kernels_are_config_errors():
    with pytest.raises(ModelConfigError, match="attention_impl='flash'"):
        tiny_config(attention_impl="flash")
    with pytest.raises(ModelConfigError, match="decode_attention_impl='paged'"):
        tiny_config(decode_attention_impl="paged")


def _cache(rng, b=3, kv=2, c=256, d=8):
    k = jnp.asarray(rng.normal(size=(b, kv, d, c)), jnp.float32)  # keys transposed: [B, kv, hd, C]
    v = jnp.asarray(rng.normal(size=(b, kv, c, d)), jnp.float32)
    return layers.KVCache(k, v)


def test_ragged_decode_equals_dense_at_every_fill_level_with_one_compile():
    rng = np.random.default_rng(2)
    b, h, c, d, block = 3, 4, 256, 8, 64
    cache = _cache(rng, b=b, c=c, d=d)
    q = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32)
    pad = np.array([0, 5, 70])  # row 2's pad slots span a whole block boundary
    traces = []

    @jax.jit
    def ragged(q, cache, mask, filled):
        traces.append(1)
        return layers.decode_attention(q, cache, mask, "ragged", filled, block=block)

    slots = np.arange(c)
    for filled in (1, 63, 64, 65, 71, 128, 200, 256):
        valid = (slots[None, :] < filled) & ((slots[None, :] >= pad[:, None]) | (slots[None, :] == filled - 1))
        mask = jnp.asarray(valid)
        dense = layers.decode_attention(q, cache, mask, "dense")
        got = ragged(q, cache, mask, jnp.int32(filled))
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=1e-5, rtol=1e-5, err_msg=f"filled={filled}")
    assert len(traces) == 1


def test_ragged_block_shrinks_to_a_divisor_of_the_cache_length():
    assert layers._divisor_block(96, 128) == 96
    assert layers._divisor_block(320, 128) == 80
    assert layers._divisor_block(256, 128) == 128
    rng = np.random.default_rng(3)
    cache = _cache(rng, c=96)
    q = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
    mask = jnp.asarray(np.arange(96)[None, :].repeat(3, 0) < 50)
    np.testing.assert_allclose(
        np.asarray(layers.decode_attention(q, cache, mask, "ragged", 50)),
        np.asarray(layers.decode_attention(q, cache, mask, "dense")),
        atol=1e-5,
        rtol=1e-5,
    )


def test_switched_kernels_give_the_same_forward_and_greedy_generations():

    from rema_jax.models.testing import chatml_bpe_tokenizer
    from rema_jax.sampling import Sampler, SamplingParams

    tok = chatml_bpe_tokenizer("")
    base = tiny_config(vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,))
    params = random_params(base, jax.random.key(0))
    switched = base.replace(attention_impl="xla", decode_attention_impl="ragged")
    tokens = jnp.asarray(np.random.default_rng(4).integers(3, base.vocab_size, size=(2, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] >= np.array([[0], [4]])).astype(jnp.int32)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(forward(switched, params, tokens, attention_mask=mask))[real],
        np.asarray(forward(base, params, tokens, attention_mask=mask))[real],
        atol=1e-4,
        rtol=1e-5,
    )
    prompts = [[5, 6, 7, 8, 9, 10], list(range(11, 40)), [40, 41]]
    sp = SamplingParams(max_new_tokens=20, greedy=True, ignore_eos=True)
    want = Sampler(base, tok, max_cache_len=128).generate(params, None, prompts, sp)
    got = Sampler(switched, tok, max_cache_len=128).generate(params, None, prompts, sp)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
