"""Adapters: LoRA identity at init, LoRA == merged weights, full copies, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.models import Adapter, AdapterConfig, forward, init_adapter, merge_adapter
from rema_jax.models.testing import random_params, tiny_config


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, random_params(config, jax.random.key(0))


TOKENS = jnp.array([[5, 9, 17, 33, 2, 70]], jnp.int32)


def _with_random_b(adapter, key):
    leaves, treedef = jax.tree.flatten_with_path(adapter.weights)
    keys = jax.random.split(key, len(leaves))
    new = [0.1 * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x for (path, x), k in zip(leaves, keys)]
    return adapter.replace(weights=jax.tree.unflatten(treedef, new))


def test_lora_at_init_equals_base_exactly(model):
    config, params = model
    adapter = init_adapter(config, params, AdapterConfig("lora", rank=4, alpha=8), jax.random.key(1))
    assert adapter.scale == 2.0
    np.testing.assert_array_equal(forward(config, params, TOKENS, adapter), forward(config, params, TOKENS))
    a = adapter.weights["layers_1"]["mlp"]["down_proj"]["lora_a"]
    assert a.shape == (config.intermediate_size, 4) and float(jnp.abs(a).max()) > 0


def test_lora_forward_equals_merged_params(model):
    config, params = model
    adapter = init_adapter(
        config,
        params,
        AdapterConfig("lora", rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")),
        jax.random.key(1),
    )
    adapter = _with_random_b(adapter, jax.random.key(2))
    assert set(adapter.weights["layers_0"]) == {"self_attn", "mlp"}
    lora_logits = forward(config, params, TOKENS, adapter)
    base_logits = forward(config, params, TOKENS)
    merged_logits = forward(config, merge_adapter(params, adapter), TOKENS)
    assert float(jnp.abs(lora_logits - base_logits).max()) > 1e-3
    np.testing.assert_allclose(lora_logits, merged_logits, atol=1e-4)
    # merge never mutates the shared base tree
    np.testing.assert_array_equal(forward(config, params, TOKENS), base_logits)


@pytest.mark.parametrize(
    "targets",
    [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("q_proj", "v_proj", "up_proj")],
)
def test_lora_gradients_equal_merged_params_gradients(model, targets):
    """d loss / d(A, B) through the low-rank path (shared `x @ A` for q/k/v and gate/up, scale folded
    into B) equals the gradient through the merged kernels `W + scale * A @ B`."""
    config, params = model
    adapter = init_adapter(config, params, AdapterConfig("lora", rank=4, alpha=8, targets=targets), jax.random.key(1))
    adapter = _with_random_b(adapter, jax.random.key(2))
    tokens = jnp.array([[5, 9, 17, 33, 2, 70], [3, 4, 8, 100, 64, 1]], jnp.int32)
    weight = jax.random.normal(jax.random.key(3), (2, 6, config.vocab_size))

    def loss_lora(w):
        return jnp.sum(forward(config, params, tokens, adapter.replace(weights=w)) * weight)

    def loss_merged(w):
        return jnp.sum(forward(config, merge_adapter(params, adapter.replace(weights=w)), tokens) * weight)

    (v1, g1), (v2, g2) = (jax.value_and_grad(f)(adapter.weights) for f in (loss_lora, loss_merged))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_full_adapter_is_a_copy_and_replaces_base(model):
    config, params = model
    adapter = init_adapter(config, params, AdapterConfig("full"), jax.random.key(1))
    np.testing.assert_array_equal(forward(config, params, TOKENS, adapter), forward(config, params, TOKENS))
    changed = adapter.replace(weights=jax.tree.map(lambda x: x * 1.1, adapter.weights))
    assert float(jnp.abs(forward(config, params, TOKENS, changed) - forward(config, params, TOKENS)).max()) > 1e-3
    assert merge_adapter(params, changed) is changed.weights


def test_shared_is_none(model):
    config, params = model
    assert init_adapter(config, params, AdapterConfig("shared"), jax.random.key(1)) is None
    assert merge_adapter(params, None) is params


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_switching_agents_does_not_recompile(model, kind):
    config, params = model
    traces = []

    def counted(params, tokens, adapter):
        traces.append(1)
        return forward(config, params, tokens, adapter)

    f = jax.jit(counted)
    cfg = AdapterConfig(kind, rank=4, alpha=8)
    mta = init_adapter(config, params, cfg, jax.random.key(1))
    ra = init_adapter(config, params, cfg, jax.random.key(2))
    if kind == "lora":
        ra = _with_random_b(ra, jax.random.key(3))
    out_mta, out_ra = f(params, TOKENS, mta), f(params, TOKENS, ra)
    f(params, TOKENS, mta)
    assert len(traces) == 1
    if kind == "lora":
        assert float(jnp.abs(out_mta - out_ra).max()) > 1e-3


def test_adapter_is_pytree_with_static_fields():
    adapter = Adapter(weights={"x": jnp.ones(2)}, kind="lora", scale=2.0)
    leaves, treedef = jax.tree.flatten(adapter)
    assert len(leaves) == 1
    assert jax.tree.unflatten(treedef, leaves).scale == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="qlora"), "kind"),
        (dict(kind="lora", rank=0), "rank"),
        (dict(kind="lora", alpha=0), "alpha"),
        (dict(kind="lora", targets=("q_proj", "w_proj")), "w_proj"),
    ],
)
def test_adapter_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)
