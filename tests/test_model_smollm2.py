"""Real SmolLM2-135M-Instruct GGUF: config facts, tokenizer, logit parity with transformers (fp32)."""

import hf_reference  # tests/hf_reference.py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rema_jax.models import forward  # noqa: E402
from rema_jax.models.hub import load  # noqa: E402

pytestmark = pytest.mark.real_model

PROMPTS = [
    [{"role": "user", "content": "What is 12 * 7? Think step by step."}],
    [
        {"role": "system", "content": "You are a meta-thinking agent. Write a short plan."},
        {"role": "user", "content": "Solve x^2 - 5x + 6 = 0."},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return hf_reference.load_smollm2(smollm2_gguf)


def _ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_config_and_tokenizer_facts(ours):
    c = ours.config
    assert (c.family, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 1e5 and c.tie_word_embeddings and "lm_head" not in ours.params
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    tok = ours.tokenizer
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    text = tok.decode(_ids(tok, PROMPTS[0]))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_logit_parity_with_transformers(ours, reference):
    f = jax.jit(forward, static_argnums=0)
    worst = 0.0
    for messages in PROMPTS:
        ids = _ids(ours.tokenizer, messages)
        got = np.asarray(f(ours.config, ours.params, jnp.asarray([ids], jnp.int32)))
        with torch.no_grad():
            want = reference(torch.tensor([ids])).logits.numpy()
        assert got.shape == want.shape == (1, len(ids), 49152)
        worst = max(worst, float(np.abs(got - want).max()))
        assert got[0, -1].argmax() == want[0, -1].argmax()
    print(f"SmolLM2 GGUF: max |dlogit| = {worst:.2e}")
    assert worst <= 1e-3
