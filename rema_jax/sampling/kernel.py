"""The inference-optimised transformer path of the sampler: fused weights, prefill, decode loop.

Same math as `rema_jax.models.forward` (tested to give the same logits): the norms, rotary embedding,
attention and gated MLP are the shared `rema_jax.models.layers` functions; this module only lays the
weights and the loop out for decoding:
- Weights are prepared once per `generate` call, outside the loop (`fuse_params`), in the compute
  dtype or `ModelConfig.sampler_weight_dtype` (e.g. bf16 matrices, fp32 accumulation): LoRA is merged
  into the kernels (the per-step cost is then the base model's), q/k/v and gate/up kernels are
  concatenated so each layer does three matmuls instead of seven. Optionally each fused kernel is
  then cut into `column_blocks` column blocks (`[in, out_i]`, concatenated after the product): on
  XLA:CPU independent products run on different threads, and at small batch the blocks' GEMMs
  together stream the weights faster than one GEMM does (`ModelConfig.sampler_column_blocks`,
  `Sampler.column_blocks`).
- One `layers.KVCache` per layer (keys `[B, kv_heads, head_dim, C]`, values `[B, kv_heads, C,
  head_dim]`) so per-step attention is two plain batched matmuls; buffers are carried through
  `lax.while_loop` and donated into the decode call, so XLA updates them in place (no per-step
  cache copy).
- Prefill computes the LM head only at the last prompt position.
- The loop state (`DecodeState`) is returned, so a loop that exits with few rows unfinished
  (`exit_at`) can be continued in a smaller batch (`decode_resume`); the prompt length is a traced
  input, so the decode programs depend on the cache length, not on the prompt bucket.
- Left padding: row b's prompt occupies slots `[pad_b, P)`; pad slots never attend nor are attended
  to, and rotary positions count real tokens only, so a padded row computes what it would alone.
- Prompt sharing: prefill runs each distinct prompt once (a ReMA step sends every question's prompt
  once per sample, and every plan once per solution) and gives each row its prompt's cache and
  logits. Prompts that begin with the same S tokens form a group (the system prompt and chat head
  for all rows; with them the question, for the reasoning agent's rows of one question): each group's
  prefix runs once and its keys/values fill slots `[0, S)` of its rows; the rows' remainders are
  left-padded after them (pad slots `[S, S + pad_b)`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rema_jax.models import layers
from rema_jax.models.adapters import Adapter, merge_adapter
from rema_jax.models.config import ModelConfig
from rema_jax.models.layers import ATTENTION_PROJS, KVCache, rms_norm, rope_cos_sin
from rema_jax.sampling import ops, stops

Blocks = tuple[jnp.ndarray, ...]  # a kernel `[in, out]` as column blocks `[in, out_i]` (concatenated: the kernel)


class FusedLayer(NamedTuple):
    ln1: jnp.ndarray  # [H]
    w_qkv: Blocks  # [H, (nh + 2 nkv) hd]
    b_qkv: Optional[jnp.ndarray]
    w_o: Blocks  # [nh hd, H]
    ln2: jnp.ndarray  # [H]
    w_gate_up: Blocks  # [H, 2F]
    w_down: Blocks  # [F, H]


class FusedParams(NamedTuple):
    embed_vh: jnp.ndarray  # [V, H]
    layers: tuple[FusedLayer, ...]
    norm: jnp.ndarray  # [H]
    lm_head_hv: Blocks  # [H, V] (a transposed copy of the embedding when tied)


def _column_blocks(w: jnp.ndarray, n: int) -> Blocks:
    """`w [in, out]` as `n` column blocks of near-equal width (`n` = 1: the kernel itself)."""
    return (w,) if n == 1 else tuple(jnp.array_split(w, n, axis=1))


def _matmul(x: jnp.ndarray, w: Blocks) -> jnp.ndarray:
    """`x @ concat(w, axis=1)` as one product per column block. Weights stored narrower than `x`
    (`ModelConfig.sampler_weight_dtype`) multiply `x` rounded to their dtype and accumulate in x's
    (XLA:CPU's bf16 x bf16 -> bf16 product was 6x slower than fp32 on AVX-512; -> fp32 1.5x faster)."""
    if w[0].dtype == x.dtype:
        prod = lambda wi: x @ wi  # noqa: E731
    else:
        xw = x.astype(w[0].dtype)
        prod = lambda wi: jnp.matmul(xw, wi, preferred_element_type=x.dtype)  # noqa: E731
    if len(w) == 1:
        return prod(w[0])
    return jnp.concatenate([prod(wi) for wi in w], axis=-1)


def fuse_params(config: ModelConfig, params: dict, adapter: Optional[Adapter], column_blocks: int = 1) -> FusedParams:
    """The decode-friendly weights of the agent (`params` with `adapter` merged), computed on device,
    each kernel cut into `column_blocks` column blocks."""
    if not isinstance(column_blocks, int) or column_blocks < 1:
        raise ValueError(f"fuse_params: column_blocks must be an int >= 1, got {column_blocks!r}")
    p = merge_adapter(params, adapter)
    dt, wdt = config.compute_dtype, config.sampler_weights_dtype  # norms and biases in dt; matrices in wdt
    cut = lambda w: _column_blocks(w.astype(wdt), column_blocks)  # noqa: E731
    layers = []
    for i in range(config.num_layers):
        lp = p[f"layers_{i}"]
        att, mlp = lp["self_attn"], lp["mlp"]
        b_qkv = None
        if config.attention_bias:
            b_qkv = jnp.concatenate([att[n]["bias"] for n in ATTENTION_PROJS[:3]]).astype(dt)
        layers.append(
            FusedLayer(
                ln1=lp["input_layernorm"]["scale"].astype(dt),
                w_qkv=cut(jnp.concatenate([att[n]["kernel"] for n in ATTENTION_PROJS[:3]], axis=1)),
                b_qkv=b_qkv,
                w_o=cut(att["o_proj"]["kernel"]),
                ln2=lp["post_attention_layernorm"]["scale"].astype(dt),
                w_gate_up=cut(jnp.concatenate([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], axis=1)),
                w_down=cut(mlp["down_proj"]["kernel"]),
            )
        )
    embed = p["embed_tokens"]["embedding"].astype(wdt)
    lm_head = cut(embed.T if config.tie_word_embeddings else p["lm_head"]["kernel"])
    return FusedParams(embed_vh=embed, layers=tuple(layers), norm=p["norm"]["scale"].astype(dt), lm_head_hv=lm_head)


def _qkv(config: ModelConfig, layer: FusedLayer, x: jnp.ndarray, cos, sin):
    """Heads of `x [B, T, H]`: rotated q `[B, T, nh, hd]`, rotated k and v `[B, T, nkv, hd]`."""
    nh, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, layer.ln1, config.rms_norm_eps)
    qkv = _matmul(h, layer.w_qkv)
    if layer.b_qkv is not None:
        qkv = qkv + layer.b_qkv
    q, k, v = qkv[..., : nh * hd], qkv[..., nh * hd : (nh + nkv) * hd], qkv[..., (nh + nkv) * hd :]
    return layers.qkv_heads(config, q, k, v, cos, sin)


def _mlp(config: ModelConfig, layer: FusedLayer, x: jnp.ndarray) -> jnp.ndarray:
    f = config.intermediate_size
    gu = _matmul(rms_norm(x, layer.ln2, config.rms_norm_eps), layer.w_gate_up)
    return _matmul(layers.mlp_hidden(gu[..., :f], gu[..., f:]), layer.w_down)


def _embed(config: ModelConfig, fp: FusedParams, tokens: jnp.ndarray) -> jnp.ndarray:
    return fp.embed_vh[tokens].astype(config.compute_dtype)


def _logits(config: ModelConfig, fp: FusedParams, x_bh: jnp.ndarray) -> jnp.ndarray:
    return _matmul(rms_norm(x_bh, fp.norm, config.rms_norm_eps), fp.lm_head_hv).astype(jnp.float32)


BlockKV = tuple[jnp.ndarray, jnp.ndarray]  # a block's keys (rotated) and values, [B or 1, T, kv, hd] each


def _prepend(past: BlockKV, kv: BlockKV, group_b: Optional[jnp.ndarray] = None) -> BlockKV:
    """Row b's past (`past[group_b[b]]`, `[G, S, kv, hd]`; without `group_b`, `[1 or B, S, kv, hd]`
    broadcast to kv's batch), then `kv` (`[B, T, kv, hd]`) after it."""
    b = kv[0].shape[0]

    def join(p, x):
        p = p[group_b] if group_b is not None else jnp.broadcast_to(p, (b,) + p.shape[1:])
        return jnp.concatenate([p.astype(x.dtype), x], axis=1)

    return join(past[0], kv[0]), join(past[1], kv[1])


def _attend_block(
    config: ModelConfig,
    fp: FusedParams,
    x: jnp.ndarray,
    cos,
    sin,
    mask_bts: jnp.ndarray,
    past: Optional[tuple[BlockKV, ...]] = None,
    group_b: Optional[jnp.ndarray] = None,
) -> tuple[jnp.ndarray, list[BlockKV]]:
    """Runs every layer on `x [B, T, H]` (rotary tables `cos`/`sin` for its positions). Queries attend
    to `past` (per layer `[1 or B, S, kv, hd]` keys/values, e.g. a shared prompt prefix) and then to
    the block itself, under `mask_bts [B, T, S + T]`. Returns the output and the block's own
    per-layer keys/values `[B, T, kv, hd]` (rotated keys)."""
    b, t = x.shape[:2]
    out_kv = []
    for i, layer in enumerate(fp.layers):
        q, k, v = _qkv(config, layer, x, cos, sin)
        out_kv.append((k, v))
        if past is not None:
            k, v = _prepend(past[i], out_kv[-1], group_b)  # gathered layer by layer, not all up front
        att = layers.dot_product_attention(q, k, v, mask_bts, config.attention_impl).reshape(b, t, -1)
        x = x + _matmul(att, layer.w_o)
        x = x + _mlp(config, layer, x)
    return x, out_kv


def prefill(
    config: ModelConfig,
    fp: FusedParams,
    tokens_up: jnp.ndarray,
    pad_u: jnp.ndarray,
    cache_len: int,
    prefix_gs: Optional[jnp.ndarray] = None,
    group_u: Optional[jnp.ndarray] = None,
    prompt_b: Optional[jnp.ndarray] = None,
) -> tuple[tuple[KVCache, ...], jnp.ndarray]:
    """Runs the prompts; returns the per-layer caches `[B, kv, cache_len, hd]` and the next-token
    logits `[B, V]` at the last prompt position.

    Without `prefix_gs`: `tokens_up [U, P]` are whole left-padded prompts, in slots `[0, P)`.
    With `prefix_gs [G, S]` (prefixes that groups of prompts share, e.g. the system prompt, or the
    system prompt and the question): each is computed once, at positions `0..S-1` in slots `[0, S)`
    of its prompts (`group_u [U]`: prompt u's group; None when G = 1: broadcast), and `tokens_up [U, Q]` are
    the prompts' left-padded remainders in slots `[S, S + Q)` (pad slots `[S, S + pad_u)`), at
    positions `S, ...`. Prefill then costs `G*S + U*Q` token-passes instead of `U*(S + Q)`.
    `prompt_b [B]`: row b continues prompt `prompt_b[b]` (rows sharing a prompt get copies of its
    cache and logits); None: row b is prompt b."""
    u, q_len = tokens_up.shape
    s_len = 0 if prefix_gs is None else prefix_gs.shape[1]
    past = None
    if prefix_gs is not None:
        pos_1s = jnp.arange(s_len, dtype=jnp.int32)[None]
        causal = (pos_1s[0][:, None] >= pos_1s[0][None, :])[None]
        _, past = _attend_block(config, fp, _embed(config, fp, prefix_gs), *rope_cos_sin(pos_1s, config), causal)
    slots = jnp.arange(q_len, dtype=jnp.int32)
    positions_uq = s_len + jnp.maximum(slots[None, :] - pad_u[:, None], 0)
    real_uq = slots[None, :] >= pad_u[:, None]
    mask_uts = (slots[:, None] >= slots[None, :])[None] & real_uq[:, None, :]
    if s_len:
        mask_uts = jnp.concatenate([jnp.ones((u, q_len, s_len), bool), mask_uts], axis=-1)
    x, block_kv = _attend_block(
        config, fp, _embed(config, fp, tokens_up), *rope_cos_sin(positions_uq, config), mask_uts, past, group_u
    )
    rows = (lambda a: a) if prompt_b is None else (lambda a: a[prompt_b])  # noqa: E731
    caches = tuple(
        layers.kv_cache_from_block(*map(rows, kv if past is None else _prepend(past[i], kv, group_u)), cache_len)
        for i, kv in enumerate(block_kv)
    )
    return caches, rows(_logits(config, fp, x[:, -1]))


def decode_step(
    config: ModelConfig,
    fp: FusedParams,
    caches: tuple[KVCache, ...],
    tok_b: jnp.ndarray,
    pos_b: jnp.ndarray,
    slot,
    pad_b: jnp.ndarray,
    prefix_len=0,
) -> tuple[tuple[KVCache, ...], jnp.ndarray]:
    """Feeds one token per row (rotary position `pos_b`, cache slot `slot`); returns the updated
    caches and the next-token logits `[B, V]`. Row b's pad slots are `[prefix_len, prefix_len + pad_b)`."""
    b = tok_b.shape[0]
    c = caches[0].v.shape[2]
    cos, sin = rope_cos_sin(pos_b[:, None], config)
    c_1c = jnp.arange(c, dtype=jnp.int32)[None, :]
    valid_bc = ((c_1c < prefix_len) | (c_1c >= prefix_len + pad_b[:, None])) & (c_1c <= slot)
    x = _embed(config, fp, tok_b)
    new_caches = []
    for layer, kv in zip(fp.layers, caches):
        q, k, v = _qkv(config, layer, x[:, None], cos, sin)
        kv = layers.kv_cache_write(kv, k, v, slot)
        att = layers.decode_attention(q[:, 0], kv, valid_bc, config.decode_attention_impl, slot + 1).reshape(b, -1)
        x = x + _matmul(att, layer.w_o)
        x = x + _mlp(config, layer, x)
        new_caches.append(kv)
    return tuple(new_caches), _logits(config, fp, x)


class DecodeInputs(NamedTuple):
    """Dynamic (traced) inputs of the decode loop."""

    pad_b: jnp.ndarray  # [B] int32 pad slots per row (after the shared prefix, if any)
    prefix_len: jnp.ndarray  # () int32 slots [0, prefix_len) hold a prefix shared by every row
    prompt_len: jnp.ndarray  # () int32 prompt slots P (shared prefix + bucketed remainder)
    active_b: jnp.ndarray  # [B] bool, False for filler rows of the batch bucket
    seeds_b: jnp.ndarray  # [B] uint32: row b samples with key fold_in(key(seeds_b[b]), row_ids_b[b])
    row_ids_b: jnp.ndarray  # [B] int32
    max_new_tokens: jnp.ndarray  # () int32
    temperature: jnp.ndarray  # () float32
    top_p: jnp.ndarray  # () float32
    eos_ids: jnp.ndarray  # [n_eos] int32 (n_eos may be 0)


class DecodeState(NamedTuple):
    """The decode loop's carry besides the caches: what `decode` returns and `decode_resume` continues."""

    t: jnp.ndarray  # () int32: the index of the next token to sample (tokens [0, t) are in tokens_bn)
    tok_b: jnp.ndarray  # [B] int32: the last sampled token, fed at the next step
    done_b: jnp.ndarray  # [B] bool: finished (EOS, stop string, max_new_tokens) or a filler row
    tokens_bn: jnp.ndarray  # [B, N] int32, valid up to lengths_b
    logprobs_bn: jnp.ndarray  # [B, N] float32
    lengths_b: jnp.ndarray  # [B] int32
    stopped_b: jnp.ndarray  # [B] bool: finished on EOS or a stop string (else: length)
    hist: jnp.ndarray  # [B, W] int32: the stop-string byte history ([B, 1] zeros without stop strings)


def _picker(mode: ops.SamplingMode, inp: DecodeInputs, stop_tables: Optional[stops.StopTables], b: int):
    """`pick(logits [B, V], step, done_b, hist) -> (tokens, log-probs, newly finished, hist)`: samples
    token `step` of every row with its own key (fold_in(key(seed), row id), then the step), so a row's
    tokens do not depend on the batch it runs in."""
    use_eos = inp.eos_ids.shape[0] > 0
    row_keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(inp.seeds_b, inp.row_ids_b)

    def pick(logits, step, done_b, hist):
        u_b = jnp.zeros((b,), jnp.float32) if mode.greedy else ops.row_uniforms(row_keys, step)
        tok_b, lp_b = ops.sample_tokens(logits, u_b, mode, inp.temperature, inp.top_p)
        hit_b = jnp.isin(tok_b, inp.eos_ids) if use_eos else jnp.zeros((b,), bool)
        if stop_tables is not None:
            hist, stop_hit_b = stops.update_and_match(hist, tok_b, stop_tables)
            hit_b = hit_b | stop_hit_b
        return tok_b, lp_b, hit_b & ~done_b, hist

    return pick


def _decode_loop(
    config: ModelConfig,
    mode: ops.SamplingMode,
    fp: FusedParams,
    caches: tuple[KVCache, ...],
    state: DecodeState,
    inp: DecodeInputs,
    stop_tables: Optional[stops.StopTables],
    exit_at: int,
) -> tuple[DecodeState, tuple[KVCache, ...]]:
    """Steps every row until all have finished or `max_new_tokens` are sampled, or (`exit_at` > 0) until
    at most `exit_at` rows are unfinished, so the caller can continue those in a smaller batch."""
    b = state.done_b.shape[0]
    pick = _picker(mode, inp, stop_tables, b)
    real_len_b = inp.prompt_len - inp.pad_b

    def cond(carry):
        st = carry[0]
        going = (st.t < inp.max_new_tokens) & ~jnp.all(st.done_b)
        if exit_at:
            going = going & (jnp.sum(~st.done_b) > exit_at)
        return going

    def body(carry):
        st, kv = carry
        t = st.t
        kv, logits = decode_step(
            config, fp, kv, st.tok_b, real_len_b + t - 1, inp.prompt_len + t - 1, inp.pad_b, inp.prefix_len
        )
        new_b, lp_b, hit_b, hist = pick(logits, t, st.done_b, st.hist)
        st = DecodeState(
            t=t + 1,
            tok_b=new_b,
            done_b=st.done_b | hit_b | (t + 1 >= inp.max_new_tokens),
            tokens_bn=jax.lax.dynamic_update_slice(st.tokens_bn, new_b[:, None], (0, t)),
            logprobs_bn=jax.lax.dynamic_update_slice(st.logprobs_bn, lp_b[:, None], (0, t)),
            lengths_b=st.lengths_b + (~st.done_b).astype(jnp.int32),
            stopped_b=st.stopped_b | hit_b,
            hist=hist,
        )
        return st, kv

    state, caches = jax.lax.while_loop(cond, body, (state, caches))
    return state, caches


def decode(
    config: ModelConfig,
    mode: ops.SamplingMode,
    fp: FusedParams,
    caches: tuple[KVCache, ...],
    logits_bv: jnp.ndarray,
    inp: DecodeInputs,
    stop_tables: Optional[stops.StopTables],
    *,
    n_out: int,
    exit_at: int = 0,
) -> tuple[DecodeState, tuple[KVCache, ...]]:
    """Samples up to `max_new_tokens` (<= `n_out`) tokens per row with a `lax.while_loop` that exits
    as soon as every row has finished, or (`exit_at` > 0) as soon as at most `exit_at` rows are
    unfinished (`decode_resume` continues them). `logits_bv` are the prefill's next-token logits;
    generated token t is fed back at slot `inp.prompt_len + t`.
    Also returns the final caches, so a donated input cache aliases the output (updated in place)."""
    b = logits_bv.shape[0]
    pick = _picker(mode, inp, stop_tables, b)
    hist0 = stops.init_history(b, stop_tables) if stop_tables is not None else jnp.zeros((b, 1), jnp.int32)
    done0 = ~inp.active_b
    tok0, lp0, hit0, hist0 = pick(logits_bv, 0, done0, hist0)
    state = DecodeState(
        t=jnp.int32(1),
        tok_b=tok0,
        done_b=done0 | hit0 | (inp.max_new_tokens <= 1),
        tokens_bn=jnp.zeros((b, n_out), jnp.int32).at[:, 0].set(tok0),
        logprobs_bn=jnp.zeros((b, n_out), jnp.float32).at[:, 0].set(lp0),
        lengths_b=inp.active_b.astype(jnp.int32),
        stopped_b=hit0,
        hist=hist0,
    )
    return _decode_loop(config, mode, fp, caches, state, inp, stop_tables, exit_at)


def decode_resume(
    config: ModelConfig,
    mode: ops.SamplingMode,
    fp: FusedParams,
    caches: tuple[KVCache, ...],
    state: DecodeState,
    keep_k: jnp.ndarray,
    inp_k: DecodeInputs,
    stop_tables: Optional[stops.StopTables],
    *,
    exit_at: int = 0,
) -> tuple[DecodeState, tuple[KVCache, ...]]:
    """Continues rows `keep_k [K]` (K < B) of an exited `decode` / `decode_resume` as a batch of K:
    their caches and loop state are gathered, then stepped like `decode` (`inp_k`: the kept rows'
    inputs). A decode step's cost grows with the batch (at SmolLM2 size on 2 CPU cores ~23 ms +
    ~3 ms per row), so once most rows have finished the rest run cheaper in a smaller batch; each
    row's tokens are what it samples in any batch (its own key per step)."""
    take = lambda a: a[keep_k]  # noqa: E731
    caches = tuple(KVCache(k=take(kv.k), v=take(kv.v)) for kv in caches)
    state = state._replace(**{f: take(getattr(state, f)) for f in DecodeState._fields if f != "t"})
    return _decode_loop(config, mode, fp, caches, state, inp_k, stop_tables, exit_at)
