"""Tiny random models for fast unit tests (here and in other packages' tests)."""

from __future__ import annotations

import functools

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


# ---------------------------------------------------------------------------- a tiny chat tokenizer
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def chatml_bpe_tokenizer(extra_text: str = ""):
    """A tiny byte-level BPE tokenizer (600 tokens, any text encodes) with a ChatML template and EOS
    ``<|im_end|>``, trained in-process on the agents' system prompts plus ``extra_text``: real
    chat-template and EOS behaviour for rollout, trainer and benchmark runs on random models, without
    a model file. Needs ``tokenizers`` and ``transformers`` (imported here, on first use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rema_jax.rollout import prompts as P

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [P.CODE_MT_MTA_SYSTEM, P.CODE_MT_RA_SYSTEM, P.PAPER_MAMRP_HIGH_SYSTEM, extra_text]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf
