"""HF-directory loader: logit parity with transformers on tiny random checkpoints, and bad-input errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rema_jax.models import forward  # noqa: E402
from rema_jax.models.config import CheckpointError, ModelConfigError  # noqa: E402
from rema_jax.models.hf_loader import load_hf_dir  # noqa: E402
from rema_jax.models.hub import load  # noqa: E402

fwd = jax.jit(forward, static_argnums=0)
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
VARIANTS = {
    "llama": ("llama", dict(rope_theta=10000.0)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama31_rope": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0)),
}


def make_hf_model(model_type, seed=0, **overrides):
    """A tiny random transformers model with non-trivial norms/biases (so every tensor matters)."""
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return model


def save(model, directory, **kwargs):
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return pathlib.Path(directory)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


TOKENS = np.array([[1, 5, 17, 33, 64, 90, 2, 40, 41, 42, 7, 8]], np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logit_parity_with_transformers(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    model = make_hf_model(model_type, **overrides)
    config, params = load_hf_dir(save(model, tmp_path / variant))
    assert config.family == model_type and config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert ("lm_head" in params) != config.tie_word_embeddings
    positions = jnp.arange(0, 12 * 16, 16, dtype=jnp.int32)[None]  # long positions exercise rope scaling
    ours = np.asarray(fwd(config, params, jnp.asarray(TOKENS), positions_bt=positions))
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS), position_ids=torch.tensor(np.asarray(positions))).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"{variant}: max |dlogit| = {err:.2e}")
    assert err <= 1e-4


def test_left_padded_batch_matches_transformers(tmp_path):
    model = make_hf_model("qwen2")
    config, params = load_hf_dir(save(model, tmp_path / "m"))
    short = TOKENS[:, :7]
    batch = np.stack([np.concatenate([np.zeros(5, np.int32), short[0]]), TOKENS[0]])
    mask = np.stack([np.r_[np.zeros(5), np.ones(7)], np.ones(12)]).astype(np.int32)
    ours = np.asarray(fwd(config, params, jnp.asarray(batch), attention_mask=jnp.asarray(mask)))
    err = max(
        np.abs(ours[0, 5:] - torch_logits(model, short)[0]).max(),
        np.abs(ours[1] - torch_logits(model, TOKENS)[0]).max(),
    )
    print(f"left padding: max |dlogit| = {err:.2e}")
    assert err <= 1e-4


def test_sharded_checkpoint(tmp_path):
    model = make_hf_model("llama", seed=1)
    directory = save(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 2
    config, params = load_hf_dir(directory)
    assert np.abs(np.asarray(fwd(config, params, jnp.asarray(TOKENS))) - torch_logits(model, TOKENS)).max() <= 1e-4


def test_bf16_checkpoint_and_dtype_policy(tmp_path):
    model = make_hf_model("llama", seed=2)
    directory = save(model.to(torch.bfloat16), tmp_path / "bf16")
    config, params = load_hf_dir(directory, dtype="float32", param_dtype="bfloat16")
    assert config.dtype == "float32" and config.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    # reference: the bf16-rounded weights computed in fp32 (a fresh model: `.to(bf16)` also rounds RoPE buffers)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ref = torch_logits(ref_model, TOKENS)
    assert np.abs(np.asarray(fwd(config, params, jnp.asarray(TOKENS))) - ref).max() <= 1e-4
    config32, params32 = load_hf_dir(directory)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params32)) and config32.param_dtype == "float32"


def test_load_entry_point_on_directory(tmp_path):
    directory = save(make_hf_model("llama"), tmp_path / "m")
    loaded = load(directory, with_tokenizer=False)
    assert loaded.config.num_layers == 2 and loaded.source == str(directory)


# ------------------------------------------------------------------ bad input
@pytest.fixture()
def checkpoint(tmp_path):
    return save(make_hf_model("llama"), tmp_path / "ckpt")


def _rewrite(directory, mutate):
    from safetensors.numpy import load_file, save_file

    f = directory / "model.safetensors"
    tensors = load_file(f)
    mutate(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf_dir(checkpoint)


def test_no_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_hf_dir(checkpoint)


def test_truncated_file(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        load_hf_dir(checkpoint)


def test_corrupt_header(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}" + f.read_bytes()[100:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf_dir(checkpoint)


def test_wrong_shape(checkpoint):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(checkpoint, lambda t: t.__setitem__(name, np.zeros((64, 31), np.float32)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \(31, 64\)"):
        load_hf_dir(checkpoint)


def test_unknown_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unknown tensor name 'model\.layers\.0\.self_attn\.rotary\.weight'"):
        load_hf_dir(checkpoint)


def test_missing_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' is missing"):
        load_hf_dir(checkpoint)


def test_index_names_missing_shard(tmp_path):
    directory = save(make_hf_model("llama"), tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in .*index\.json"):
        load_hf_dir(directory)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mistral"}, "'model_type': unsupported model_type 'mistral'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "unsupported rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "'hidden_act'"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "'use_sliding_window'"),
        ({"num_key_value_heads": 3}, "'num_key_value_heads'"),
    ],
)
def test_unsupported_config_fields(checkpoint, change, match):
    f = checkpoint / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    with pytest.raises(ModelConfigError, match=match) as info:
        load_hf_dir(checkpoint)
    assert str(f) in str(info.value)


def test_tokenizer_is_built_once_per_file_and_each_caller_gets_its_own(tmp_path):
    import os

    from rema_jax.models import tokenizer as tokenizer_lib
    from rema_jax.models.testing import chatml_bpe_tokenizer

    chatml_bpe_tokenizer().save_pretrained(tmp_path)
    tokenizer_lib._load_once.cache_clear()
    a = tokenizer_lib.load_tokenizer(tmp_path)
    b = tokenizer_lib.load_tokenizer(tmp_path)
    assert tokenizer_lib._load_once.cache_info().misses == 1  # converted once, copied after
    assert a is not b and a.encode("7 times 8") == b.encode("7 times 8") and a.chat_template == b.chat_template
    a.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # a caller's change stays its own
    assert len(b) == len(tokenizer_lib.load_tokenizer(tmp_path)) == len(a) - 1
    # a rewritten file is read again
    path = tmp_path / "tokenizer.json"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    tokenizer_lib.load_tokenizer(tmp_path)
    assert tokenizer_lib._load_once.cache_info().misses == 2
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        tokenizer_lib.load_tokenizer(tmp_path / "missing")
