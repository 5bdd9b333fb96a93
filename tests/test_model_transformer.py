"""Transformer forward: padding, init shapes, dtype policy (tiny random configs).

The forward has no KV cache; cached decoding (the sampler's prefill/decode) is checked against it in
tests/test_sampler.py, the shared layer math in tests/test_model_layers.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.models import forward, param_shapes
from rema_jax.models.testing import random_params, tiny_config
from rema_jax.models.transformer import Transformer

fwd = jax.jit(forward, static_argnums=0)


def _tokens(key, b, t, vocab=128):
    return jax.random.randint(key, (b, t), 3, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "family": "qwen2"}])
def test_linen_init_matches_param_shapes(overrides):
    config = tiny_config(**overrides)
    tokens = _tokens(jax.random.key(0), 1, 4)
    init = Transformer(config).init(jax.random.key(1), tokens, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 4), bool))
    got = jax.tree.map(lambda x: tuple(x.shape), init["params"])
    want = param_shapes(config)
    assert got == want


def test_logits_shape_dtype_and_finite():
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    logits = fwd(config, params, _tokens(jax.random.key(1), 2, 7))
    assert logits.shape == (2, 7, config.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_left_padding_matches_unpadded_rows():
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    short, long = _tokens(jax.random.key(1), 1, 4), _tokens(jax.random.key(2), 1, 7)
    padded = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], 1), long], 0)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], jnp.int32)
    logits = fwd(config, params, padded, attention_mask=mask)
    np.testing.assert_allclose(logits[0, 3:], fwd(config, params, short)[0], atol=1e-5)
    np.testing.assert_allclose(logits[1], fwd(config, params, long)[0], atol=1e-5)


def test_bf16_compute_close_to_fp32():
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    tokens = _tokens(jax.random.key(1), 1, 6)
    ref = fwd(config, params, tokens)
    bf_config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    got = fwd(bf_config, bf_params, tokens)
    assert got.dtype == jnp.float32
    assert jax.tree.leaves(bf_params)[0].dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got - ref))) < 0.25 * float(jnp.max(jnp.abs(ref)))


def test_bad_shapes_raise():
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="tokens_bt"):
        forward(config, params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        forward(config, params, jnp.zeros((1, 4), jnp.int32), attention_mask=jnp.ones((1, 5)))


def test_logits_at_gathers_the_same_logits():
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    full = forward(config, params, tokens)
    at = jnp.array([[0, 5, 11], [3, 3, 7]])
    part = forward(config, params, tokens, logits_at_bk=at)
    assert part.shape == (2, 3, config.vocab_size)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_head_inputs_project_to_the_logits(tied):
    """`forward(..., head_inputs=True)` returns the final hidden states at `logits_at_bk` and the head
    weight; projecting them gives `forward`'s logits there (tied embedding and separate lm_head)."""
    from rema_jax.models.transformer import HeadInputs

    config = tiny_config(tie_word_embeddings=tied)
    params = random_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    at = jnp.array([[0, 5, 11], [3, 3, 7]])
    head = forward(config, params, tokens, logits_at_bk=at, head_inputs=True)
    assert isinstance(head, HeadInputs) and head.tied is tied
    assert head.hidden_bkh.shape == (2, 3, config.hidden_size)
    np.testing.assert_array_equal(head.logits(), forward(config, params, tokens, logits_at_bk=at))
