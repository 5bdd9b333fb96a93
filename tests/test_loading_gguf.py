"""GGUF loader: Q/K un-permutation round trip on a tiny synthetic GGUF, bad files, and the real SmolLM2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from rema_jax.models import forward  # noqa: E402
from rema_jax.models.config import CheckpointError, ModelConfigError  # noqa: E402
from rema_jax.models.gguf_loader import load_gguf, path_to_gguf_name  # noqa: E402
from rema_jax.models.testing import random_params, tiny_config  # noqa: E402

fwd = jax.jit(forward, static_argnums=0)


def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py Q/K row permutation (what the loader must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config, params, *, arch="llama", skip=(), extra=None, reshape=None):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for path_keys, x in jax.tree.flatten_with_path(params)[0]:
        p = tuple(k.key for k in path_keys)
        name = path_to_gguf_name(p)
        if name in skip:
            continue
        w = np.asarray(x, np.float32)
        if p[-1] == "kernel":
            w = np.ascontiguousarray(w.T)  # HF [out, in]
        if arch == "llama" and p[-2] in ("q_proj", "k_proj"):
            w = llama_cpp_permute(w, config.num_heads if p[-2] == "q_proj" else config.num_kv_heads)
        if reshape and name in reshape:
            w = w.reshape(reshape[name])
        writer.add_tensor(name, np.ascontiguousarray(w))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(rms_norm_eps=1e-5)
    return config, random_params(config, jax.random.key(0))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_undoes_qk_permutation_exactly(tmp_path, tiny, tied):
    config, params = tiny
    if tied:
        config = config.replace(tie_word_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
    f = write_gguf(tmp_path / "tiny.gguf", config, params)
    got_config, got = load_gguf(f)
    assert got_config.tie_word_embeddings == tied and got_config.num_kv_heads == 2
    assert got_config.family == "llama" and got_config.eos_token_ids == (2,)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.array([[3, 9, 27, 81, 100]])
    np.testing.assert_array_equal(fwd(got_config, got, tokens), fwd(got_config, params, tokens))


def test_qwen2_gguf_is_not_permuted(tmp_path):
    config = tiny_config(rms_norm_eps=1e-5, attention_bias=True, family="qwen2")
    params = random_params(config, jax.random.key(3))
    got_config, got = load_gguf(write_gguf(tmp_path / "q.gguf", config, params, arch="qwen2"))
    assert got_config.attention_bias
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_truncated_gguf(tmp_path, tiny):
    f = write_gguf(tmp_path / "t.gguf", *tiny)
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match=r"t\.gguf"):
        load_gguf(f)


def test_unknown_gguf_tensor(tmp_path, tiny):
    f = write_gguf(tmp_path / "u.gguf", *tiny, extra={"blk.0.attn_qkv.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"u\.gguf: unknown tensor name 'blk\.0\.attn_qkv\.weight'"):
        load_gguf(f)


def test_missing_gguf_tensor(tmp_path, tiny):
    f = write_gguf(tmp_path / "m.gguf", *tiny, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing"):
        load_gguf(f)


def test_wrong_shape_gguf_tensor(tmp_path, tiny):
    f = write_gguf(tmp_path / "s.gguf", *tiny, reshape={"blk.0.ffn_down.weight": (16, 128)})
    with pytest.raises(CheckpointError, match=r"s\.gguf: tensor 'blk\.0\.ffn_down\.weight' has shape"):
        load_gguf(f)


def test_missing_and_unsupported_gguf(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")
    f = write_gguf(tmp_path / "g.gguf", *tiny, arch="gemma")
    with pytest.raises(ModelConfigError, match=r"g\.gguf: GGUF metadata 'general\.architecture'.*'gemma'"):
        load_gguf(f)


@pytest.mark.real_model
def test_gguf_tokenizer_is_converted_once_in_a_child_and_loaded_without_torch(smollm2_gguf, tmp_path, monkeypatch):
    """The converted tokenizer (cached files) tokenizes and templates exactly as the in-process
    GGUF conversion does, and a process that loads it never imports PyTorch."""
    import os
    import subprocess
    import sys

    from rema_jax.models import tokenizer as tokenizer_lib

    monkeypatch.chdir(tmp_path)  # nothing may be written beside the cache (not even a relative "None")
    cache = tmp_path / "tokenizers"
    monkeypatch.setenv(tokenizer_lib.CACHE_ENV_VAR, str(cache))
    cached = tokenizer_lib.load_tokenizer(smollm2_gguf.parent, smollm2_gguf.name)
    (entry,) = list(cache.iterdir())
    assert (entry / "tokenizer.json").exists()
    monkeypatch.setenv(tokenizer_lib.CACHE_ENV_VAR, "off")

    def no_child(*args):
        raise AssertionError("the cache is off: the conversion must run in this process")

    monkeypatch.setattr(tokenizer_lib, "_convert_in_child", no_child)
    direct = tokenizer_lib.load_tokenizer(smollm2_gguf.parent, smollm2_gguf.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizers"]
    assert type(cached) is type(direct)
    texts = ["Solve $x^2 - 5x + 6 = 0$; answer \\boxed{2, 3}.", "  spaces\tand\nnewlines  ", "ünïcödé 日本語 🙂", ""]
    for text in texts:
        assert cached(text)["input_ids"] == direct(text)["input_ids"], text
    chat = [{"role": "system", "content": "Plan first."}, {"role": "user", "content": texts[0]}]
    for add in (True, False):
        assert cached.apply_chat_template(chat, add_generation_prompt=add, tokenize=False) == (
            direct.apply_chat_template(chat, add_generation_prompt=add, tokenize=False)
        )
    special = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(cached, k) for k in special] == [getattr(direct, k) for k in special]
    assert len(cached) == len(direct) and cached.decode(direct(texts[2])["input_ids"]) == texts[2]

    code = "import sys, rema_jax.models.tokenizer as t; t.load_tokenizer(sys.argv[1], sys.argv[2]); print('torch' in sys.modules)"
    env = {**os.environ, tokenizer_lib.CACHE_ENV_VAR: str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(smollm2_gguf.parent), smollm2_gguf.name],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the repository (rema_jax importable)
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
    assert list(cache.iterdir()) == [entry]  # converted once
