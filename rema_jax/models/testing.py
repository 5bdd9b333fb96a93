"""Tiny random models for fast unit tests (here and in other packages' tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax.models.config import ModelConfig
from rema_jax.models.layers import Params
from rema_jax.models.transformer import param_shapes


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA Llama-shaped config (vocab 128, hidden 32, 4 heads / 2 KV heads); override any field."""
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_params(config: ModelConfig, key: jax.Array, std: float = 0.5) -> Params:
    """Random params matching `param_shapes(config)`: kernels ~ N(0, 1/fan_in)*std*2, norm scales
    around 1 and nonzero biases, so tests exercise every tensor (unlike a zero/ones init)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        noise = jax.random.normal(k, shape, jnp.float32)
        if name == "scale":
            value = 1.0 + 0.1 * noise
        elif name == "bias":
            value = 0.1 * noise
        elif name == "embedding":
            value = std * noise
        else:
            value = noise * (2 * std / np.sqrt(shape[0]))
        out.append(value.astype(config.params_dtype))
    return jax.tree.unflatten(treedef, out)
