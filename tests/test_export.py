"""Export round trips: merged LoRA → HF dir → transformers (logit parity) and → our loader; adapter save/load."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rema_jax.models import AdapterConfig, forward, init_adapter, merge_adapter  # noqa: E402
from rema_jax.models.config import CheckpointError, Llama3RopeScaling  # noqa: E402
from rema_jax.models.export import export_hf, load_adapter, save_adapter  # noqa: E402
from rema_jax.models.hub import load  # noqa: E402
from rema_jax.models.testing import random_params, tiny_config  # noqa: E402

TOKENS = np.array([[1, 5, 17, 33, 64, 90, 2, 40]], np.int32)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        "<unk>": 3,
        "user": 4,
        "assistant": 5,
        **{f"w{i}": i for i in range(6, 128)},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _lora_with_nonzero_b(config, params, key):
    adapter = init_adapter(config, params, AdapterConfig("lora", rank=4, alpha=8), key)
    leaves, treedef = jax.tree.flatten_with_path(adapter.weights)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    new = [0.1 * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x for (p, x), k in zip(leaves, keys)]
    return adapter.replace(weights=jax.tree.unflatten(treedef, new))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"family": "qwen2", "attention_bias": True, "tie_word_embeddings": True},
        {"rope_theta": 500000.0, "rope_scaling": Llama3RopeScaling(8.0, 1.0, 4.0, 8), "eos_token_ids": (2, 3)},
    ],
)
def test_export_merged_lora_loads_in_transformers(tmp_path, overrides):
    config = tiny_config(rms_norm_eps=1e-5, **overrides)
    params = random_params(config, jax.random.key(0))
    adapter = _lora_with_nonzero_b(config, params, jax.random.key(1))
    ours = np.asarray(forward(config, params, jnp.asarray(TOKENS), adapter))
    assert np.abs(ours - np.asarray(forward(config, params, jnp.asarray(TOKENS)))).max() > 1e-3

    directory = export_hf(tmp_path / "agent", config, params, adapter, tokenizer=tiny_tokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.family]
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"export {config.family}: max |dlogit| = {err:.2e}")
    assert err <= 1e-4

    reloaded = load(directory)  # our own loader + the exported tokenizer files
    assert reloaded.config == config
    for a, b in zip(jax.tree.leaves(merge_adapter(params, adapter)), jax.tree.leaves(reloaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (
        reloaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": "w7"}], tokenize=False, add_generation_prompt=True
        )
        == "<s>user w7</s><s>assistant"
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_save_and_load_adapter_round_trip(tmp_path, kind):
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    adapter = (
        _lora_with_nonzero_b(config, params, jax.random.key(2))
        if kind == "lora"
        else init_adapter(config, params, AdapterConfig("full"), jax.random.key(2))
    )
    got = load_adapter(save_adapter(tmp_path / kind, adapter))
    assert (got.kind, got.scale) == (adapter.kind, adapter.scale)
    assert jax.tree.structure(got) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(TOKENS)
    np.testing.assert_array_equal(forward(config, params, tokens, got), forward(config, params, tokens, adapter))


def test_load_adapter_errors(tmp_path):
    config = tiny_config()
    params = random_params(config, jax.random.key(0))
    with pytest.raises(CheckpointError, match="adapter_config.json: adapter file not found"):
        load_adapter(tmp_path / "nothing")
    d = save_adapter(tmp_path / "a", init_adapter(config, params, AdapterConfig("lora"), jax.random.key(1)))
    weights = d / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: .*corrupt or truncated"):
        load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"format": "rema_jax.adapter/1", "kind": "dora", "scale": 1}))
    with pytest.raises(CheckpointError, match="kind 'dora'"):
        load_adapter(d)
    with pytest.raises(TypeError, match="shared"):
        save_adapter(tmp_path / "s", None)
