"""ModelConfig: HF dict parsing (transformers 4.x and 5.x layouts), validation, hashability."""

import jax
import jax.numpy as jnp
import pytest

from rema_jax.models.config import Llama3RopeScaling, ModelConfig, ModelConfigError
from rema_jax.models.rope import rope_inv_freq
from rema_jax.models.testing import tiny_config

LLAMA31 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_llama31_legacy_layout():
    c = ModelConfig.from_hf_dict(LLAMA31, source="llama31/config.json")
    assert c.head_dim == 128 and c.num_groups == 4 and c.eos_token_ids == (128001, 128008, 128009)
    assert c.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192) and c.eos_token_id == 128001
    inv = rope_inv_freq(c)
    base = rope_inv_freq(c.replace(rope_scaling=None))
    assert inv[0] == base[0] and abs(inv[-1] - base[-1] / 8.0) < 1e-12  # high freqs kept, low freqs / factor


def test_transformers5_layout_and_round_trip():
    d = dict(LLAMA31, rope_scaling=None, rope_theta=None)
    d["rope_parameters"] = dict(LLAMA31["rope_scaling"], rope_theta=500000.0)
    c = ModelConfig.from_hf_dict(d, dtype="bfloat16")
    assert c.rope_theta == 500000.0 and c.rope_scaling.factor == 8.0
    assert (c.dtype, c.param_dtype, c.compute_dtype) == ("bfloat16", "bfloat16", jnp.bfloat16)
    assert ModelConfig.from_hf_dict(c.to_hf_dict(), dtype="bfloat16") == c


def test_qwen2_has_qkv_bias():
    d = {
        "model_type": "qwen2",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "eos_token_id": 5,
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.attention_bias and c.family == "qwen2" and c.tie_word_embeddings and c.eos_token_ids == (5,)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"vocab_size": None}, "vocab_size"),
        ({"hidden_size": 4095, "head_dim": None}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_fields_name_source_and_field(change, field):
    with pytest.raises(ModelConfigError, match=rf"my/config\.json: field '{field}'"):
        ModelConfig.from_hf_dict({**LLAMA31, **change}, source="my/config.json")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"dtype": "float64"}, "dtype"),
        ({"family": "mistral"}, "family"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"eos_token_ids": [2]}, "eos"),
    ],
)
def test_direct_validation(overrides, match):
    with pytest.raises(ModelConfigError, match=match):
        tiny_config(**overrides)


def test_hashable_static_jit_argument():
    c = tiny_config()
    assert hash(c) == hash(tiny_config()) and c == tiny_config()
    f = jax.jit(lambda cfg, x: x * cfg.hidden_size, static_argnums=0)
    assert int(f(c, jnp.int32(2))) == 64
