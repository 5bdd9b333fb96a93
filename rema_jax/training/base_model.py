"""The base model of a run, built one way for SFT and RL.

An SFT → RL chain trains adapters in one process and loads them in another, so both stages must
put them on the same base. ``build_base_model`` is the only place a ``ModelSection`` becomes
``(model_config, params, tokenizer)``: ``rema_jax.sft.train`` and ``rema_jax.training.trainer``
both call it. A random base (``random_init``) is a pure function of the section (shape,
``init_std``, ``seed``), never of the stage's loop seed, like a pretrained checkpoint would be.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax

from rema_jax import models
from rema_jax.training.config import ModelSection


def stable_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (e.g. (run seed, step, purpose))."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def build_base_model(section: ModelSection, mesh=None, tokenizer=None) -> tuple[Any, Any, Any]:
    """``(model_config, params, tokenizer)`` of ``section``.

    Pretrained (``random_init=None``): ``models.load``, or ``sharding.load_sharded`` onto ``mesh``
    (each tensor straight into its sharded array). Random: a ``models.testing.tiny_config`` with
    ``random_init``'s overrides and the vocabulary/special ids of ``section.source``'s tokenizer;
    two extra keys are not config fields: ``init_std`` (default 0.5; larger gives peakier
    next-token distributions) and ``seed`` (default 0). The weights are
    ``random_params(config, key(stable_seed(seed, "random_init")), std=init_std)``. ``tokenizer``
    (random bases only) replaces the source's, e.g. a tiny one in tests that need no model file.
    """
    if section.random_init is None:
        if tokenizer is not None:
            raise ValueError("build_base_model: a tokenizer can only be injected for a random_init base")
        if mesh is None:
            loaded = models.load(section.source, dtype=section.dtype, param_dtype=section.param_dtype)
        else:
            from rema_jax import sharding

            loaded, _ = sharding.load_sharded(
                section.source, mesh, dtype=section.dtype, param_dtype=section.param_dtype
            )
        return _with_kernels(loaded.config, section), loaded.params, loaded.tokenizer
    from rema_jax.models.testing import random_params, tiny_config
    from rema_jax.models.tokenizer import load_tokenizer

    if tokenizer is None:
        src = section.source
        path = os.fspath(models.smollm2_gguf_path() if src == "smollm2-135m" else src)
        tokenizer = (
            load_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path))
            if path.endswith(".gguf")
            else load_tokenizer(path)
        )
    eos = tokenizer.eos_token_id
    shape = dict(section.random_init)
    init_std = float(shape.pop("init_std", 0.5))
    seed = int(shape.pop("seed", 0))
    overrides = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id or 0,
        eos_token_ids=(eos,),
        pad_token_id=tokenizer.pad_token_id or eos,
        dtype=section.dtype,
        param_dtype=section.param_dtype or section.dtype,
    )
    overrides.update(shape)
    config = tiny_config(**overrides)
    params = random_params(config, jax.random.key(stable_seed(seed, "random_init")), std=init_std)
    return _with_kernels(config, section), params, tokenizer


def _with_kernels(config, section: ModelSection):
    """``config`` with the section's kernels, remat switch, logits chunk, sampler column blocks, sampler
    weight dtype, compaction and layout reuse (static fields: part of every jit key)."""
    return config.replace(
        attention_impl=section.attention_impl,
        decode_attention_impl=section.decode_attention_impl,
        remat=section.remat,
        remat_policy=section.remat_policy,
        scan_layers=section.scan_layers,
        logits_chunk=section.logits_chunk,
        sampler_column_blocks=section.sampler_column_blocks,
        sampler_weight_dtype=section.sampler_weight_dtype,
        sampler_compact_min_batch=section.sampler_compact_min_batch,
        sampler_layout_reuse=section.sampler_layout_reuse,
    )
