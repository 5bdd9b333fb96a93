"""Decoder-only transformer (Llama / Qwen2 / SmolLM2) as Flax Linen modules + the pure `forward()`.

Parameters are plain nested dicts named as HF names (Contract 1 in docs/architecture.md); layers are
unrolled (`layers_{i}`). The layer math (norm, rotary, attention, gated MLP) is `rema_jax.models.layers`,
shared with the sampler; this module owns the projections (with LoRA) and the training `forward`
(no KV cache: decoding is `rema_jax.sampling`). LoRA adapters are applied by
passing the adapter tree as a second, read-only Linen collection (`"lora"`) that mirrors the parameter
paths, so the base tree is never copied and switching agents is just a different pytree of the same
structure (no recompilation).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rema_jax.models import layers
from rema_jax.models.adapters import Adapter
from rema_jax.models.config import REMAT_POLICIES, ModelConfig
from rema_jax.models.layers import Params

# ---------------------------------------------------------------------------- pure helpers


def matmul_2d(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """`x [..., in] @ w [in, out]` as one 2-D matmul over the flattened leading axes.

    Why: the weight gradient `x^T dy` then contracts one axis. With `[B, T, in]` activations it
    contracts (B, T), and XLA:CPU lowers that with a strided transposing copy of `dy` (and `x`)
    per matmul, which costs about as much as the full-rank matmul; a LoRA update, whose weight
    gradients are rank-r, was dominated by those copies (see tests/test_lora_cost.py).
    """
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(lead + (w.shape[-1],))


def lora_delta(x: jnp.ndarray, lora_a: jnp.ndarray, lora_b: jnp.ndarray, scale: float) -> jnp.ndarray:
    """LoRA update `scale * (x @ A) @ B` for `x [..., in]`, `A [in, r]`, `B [r, out]`, in x's dtype.

    Rank-r order (never the `[in, out]` product), 2-D matmuls (`matmul_2d`), and `scale` folded into
    the `[r, out]` factor, so no elementwise pass over the `[tokens, out]` output is added.
    """
    return _lora_up(matmul_2d(x, lora_a.astype(x.dtype)), lora_b, scale)


def _lora_up(xa: jnp.ndarray, lora_b: jnp.ndarray, scale: float) -> jnp.ndarray:
    """`xa @ (scale * B)` for `xa = x @ A`; `scale` is applied to the small `[r, out]` factor."""
    return matmul_2d(xa, (lora_b.astype(jnp.float32) * scale).astype(xa.dtype))


def shared_lora_xa(x: jnp.ndarray, lora: Any, names: tuple[str, ...]) -> dict[str, jnp.ndarray]:
    """`{name: x @ A_name}` from one matmul against the concatenated `lora_a` factors of `names`.

    Why: projections that read the same `x` (q/k/v, gate/up) then pass over `x` once for their
    rank-r products, forward and backward (`dA` and the `dx` term are one matmul each too). The
    rank-r products are memory bound; on a 2-core CPU this cut the per-layer LoRA overhead by ~20%.
    `{}` when fewer than two of `names` carry a factor in `lora` (the `"lora"` collection at the
    parent's scope).
    """
    present = [n for n in names if "lora_a" in lora.get(n, {})]
    if len(present) < 2:
        return {}
    factors = [lora[n]["lora_a"].astype(x.dtype) for n in present]
    xa = matmul_2d(x, jnp.concatenate(factors, axis=1))
    out, start = {}, 0
    for n, a in zip(present, factors):
        out[n] = xa[..., start : start + a.shape[1]]
        start += a.shape[1]
    return out


def param_shapes(config: ModelConfig) -> Params:
    """The expected parameter tree (Contract 1) with shape tuples as leaves; loaders validate against it."""
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd

    def proj(n_in, n_out, bias=False):
        return {"kernel": (n_in, n_out), **({"bias": (n_out,)} if bias else {})}

    tree: Params = {"embed_tokens": {"embedding": (config.vocab_size, h)}}
    for i in range(config.num_layers):
        tree[f"layers_{i}"] = {
            "input_layernorm": {"scale": (h,)},
            "self_attn": {
                "q_proj": proj(h, q_out, config.attention_bias),
                "k_proj": proj(h, kv_out, config.attention_bias),
                "v_proj": proj(h, kv_out, config.attention_bias),
                "o_proj": proj(q_out, h),
            },
            "post_attention_layernorm": {"scale": (h,)},
            "mlp": {"gate_proj": proj(h, f), "up_proj": proj(h, f), "down_proj": proj(f, h)},
        }
    tree["norm"] = {"scale": (h,)}
    if not config.tie_word_embeddings:
        tree["lm_head"] = {"kernel": (h, config.vocab_size)}
    return tree


# ---------------------------------------------------------------------------- Linen modules
class Proj(nn.Module):
    """A linear projection `x @ kernel (+ bias)` plus an optional LoRA term from the "lora" collection."""

    config: ModelConfig
    features: int
    use_bias: bool = False
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, lora_xa: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`lora_xa`: `x @ lora_a` when the caller computed it (`shared_lora_xa`)."""
        cfg = self.config
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), cfg.params_dtype)
        y = matmul_2d(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), cfg.params_dtype).astype(x.dtype)
        if self.has_variable("lora", "lora_a"):
            lora_b = self.get_variable("lora", "lora_b")
            if lora_xa is None:
                y = y + lora_delta(x, self.get_variable("lora", "lora_a"), lora_b, self.lora_scale)
            else:
                y = y + _lora_up(lora_xa, lora_b, self.lora_scale)
        return y


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.config.params_dtype)
        return layers.rms_norm(x, scale, self.config.rms_norm_eps)


class Attention(nn.Module):
    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, prefix_kv=None):
        """Output `[B, T, hidden]` and this block's rotated `(k, v)` `[B, T, kv_heads, hd]`.

        `prefix_kv`: keys/values `[B, P, kv_heads, hd]` placed before this block's own (a shared
        prefix); `mask_bts` then covers `P + T` keys."""
        cfg = self.config
        b, t, _ = x_btd.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        kw = dict(config=cfg, lora_scale=self.lora_scale)
        xa = shared_lora_xa(x_btd, self.variables.get("lora", {}), ("q_proj", "k_proj", "v_proj"))
        q = Proj(features=nh * hd, use_bias=cfg.attention_bias, name="q_proj", **kw)(x_btd, xa.get("q_proj"))
        k = Proj(features=nkv * hd, use_bias=cfg.attention_bias, name="k_proj", **kw)(x_btd, xa.get("k_proj"))
        v = Proj(features=nkv * hd, use_bias=cfg.attention_bias, name="v_proj", **kw)(x_btd, xa.get("v_proj"))
        q, k, v = layers.qkv_heads(cfg, q, k, v, cos_btd, sin_btd)
        keys, values = (
            (k, v)
            if prefix_kv is None
            else (jnp.concatenate([prefix_kv[0], k], 1), jnp.concatenate([prefix_kv[1], v], 1))
        )
        out = layers.dot_product_attention(q, keys, values, mask_bts, cfg.attention_impl).reshape(b, t, nh * hd)
        return Proj(features=cfg.hidden_size, name="o_proj", **kw)(out), (k, v)


class MLP(nn.Module):
    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(config=cfg, lora_scale=self.lora_scale)
        xa = shared_lora_xa(x, self.variables.get("lora", {}), ("gate_proj", "up_proj"))
        gate = Proj(features=cfg.intermediate_size, name="gate_proj", **kw)(x, xa.get("gate_proj"))
        up = Proj(features=cfg.intermediate_size, name="up_proj", **kw)(x, xa.get("up_proj"))
        # names a remat policy can keep (ModelConfig.remat_policy); no effect otherwise
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
        return Proj(features=cfg.hidden_size, name="down_proj", **kw)(layers.mlp_hidden(gate, up))


class DecoderLayer(nn.Module):
    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, prefix_kv=None):
        """`(x_out, (k, v))`: the layer's output and its attention block's keys/values (see `Attention`)."""
        kw = dict(config=self.config, lora_scale=self.lora_scale)
        attn = Attention(name="self_attn", **kw)
        h, kv = attn(RMSNorm(self.config, name="input_layernorm")(x), cos, sin, mask_bts, prefix_kv)
        x = x + h
        x = x + MLP(name="mlp", **kw)(RMSNorm(self.config, name="post_attention_layernorm")(x))
        return x, kv


def tied_remat(fn, saved: tuple[str, ...] = ()):
    """``fn(trained, frozen, x, *rest)`` recomputed in the backward pass, with the gradients of
    ``trained`` formed before the cotangent of ``x`` moves on to the previous layer.

    ``jax.checkpoint`` saves a layer's inputs and recomputes the rest in the backward pass, but leaves
    the order to XLA, and XLA:CPU drops ``optimization_barrier`` before it schedules. Its scheduler
    defers the weight gradients to the end of the program (nothing reads them before the optimizer),
    which keeps every layer's recomputed activations (the MLP's gate/up products, ...) alive until
    then: measured on the SFT step (SmolLM2 shape, LoRA on all projections, 4 x 320 rows, 4 -> 8
    layers), 71.5 MiB of scratch per layer with ``nn.remat`` against 98 without, where a layer's
    input is 2.8 MiB.

    The backward rule here returns ``dx + 0 * sum(d trained)``: the previous layer's backward cannot
    start before this layer's weight gradients exist, so their inputs die with the layer (6.75 MiB
    per layer on the same step). ``0 * c`` is a data dependency no pass removes (it is not folded for
    floats: NaN, inf); a non-finite gradient makes ``dx`` non-finite, as it would make the update.
    It differentiates with respect to ``trained``, ``x`` and ``rest`` only: ``frozen`` (a LoRA agent's
    base weights) gets no cotangent, so no full-size weight gradient is formed. Same values as ``fn``
    and as ``jax.checkpoint(fn)`` (the same ops, in another order). Tying the recomputation to the
    incoming cotangent as well was tried: no less memory, and 3x the compile time of the RL update.

    ``saved``: `checkpoint_name`s whose values the forward pass keeps for the backward (a
    ``jax.checkpoint`` policy, `ModelConfig.remat_policy`) instead of recomputing them; e.g. the MLP's
    gate and up products, the layer's largest matmuls: one SmolLM2 reasoning micro-batch's update
    (8 rows, shared prefixes, 2-core AMD EPYC) took 7.0 s instead of 7.9 for ~0.5 GB kept.
    """

    if saved:
        keep = jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*saved))

    @jax.custom_vjp
    def remat_fn(trained, frozen, x, *rest):
        return fn(trained, frozen, x, *rest)

    def fwd(trained, frozen, x, *rest):
        if saved:  # the residuals: the inputs and the named values; the vjp recomputes the rest
            return jax.vjp(lambda t, xx, *r: keep(t, frozen, xx, *r), trained, x, *rest)
        return fn(trained, frozen, x, *rest), (trained, frozen, x, rest)

    def bwd(res, ct):
        if saved:
            vjp, ct = jax.lax.optimization_barrier((res, ct))
        else:
            (trained, frozen, x, rest), ct = jax.lax.optimization_barrier((res, ct))
            _, vjp = jax.vjp(lambda t, xx, *r: fn(t, frozen, xx, *r), trained, x, *rest)
        d_trained, dx, *d_rest = vjp(ct)
        grads = jax.tree.leaves(d_trained)
        if grads:
            dx = dx + (sum(jnp.sum(g.astype(jnp.float32)) for g in grads) * 0).astype(dx.dtype)
        return (d_trained, None, dx, *d_rest)

    remat_fn.defvjp(fwd, bwd)
    return remat_fn


def _layer_variables(module: nn.Module, name: str) -> dict[str, Any]:
    """The variables of submodule ``name`` of ``module``, per collection (apply mode only)."""
    return {col: tree[name] for col, tree in module.variables.items() if name in tree}


def _trained_and_frozen(variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A layer's variables split into what its backward pass differentiates: the LoRA factors when the
    agent has them (the base is frozen), else the layer's params (a full or shared agent)."""
    trained = {"lora": variables["lora"]} if "lora" in variables else variables
    return trained, {k: v for k, v in variables.items() if k not in trained}


def _layer_fn(cfg: ModelConfig, lora_scale: float):
    """``fn(trained, frozen, *layer_args)``: one ``DecoderLayer`` as a pure function of its variables,
    through ``tied_remat`` with ``cfg.remat``."""

    def layer_fn(trained, frozen, *layer_args):
        return DecoderLayer(cfg, lora_scale).apply({**frozen, **trained}, *layer_args)

    return tied_remat(layer_fn, REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else layer_fn


def apply_layer(module: nn.Module, cfg: ModelConfig, lora_scale: float, index: int, *args):
    """``DecoderLayer`` number ``index`` of ``module`` on ``args`` (see ``DecoderLayer.__call__``).

    At init it is a submodule (which creates ``layers_{index}``); afterwards a pure function of that
    layer's variables, through ``tied_remat`` with ``cfg.remat``, so one layer may run on several
    inputs (the shared-prefix forward's prefixes and suffixes)."""
    name = f"layers_{index}"
    if module.is_initializing():
        return DecoderLayer(cfg, lora_scale, name=name)(*args)
    return _layer_fn(cfg, lora_scale)(*_trained_and_frozen(_layer_variables(module, name)), *args)


def run_layers(module: nn.Module, cfg: ModelConfig, lora_scale: float, body, carry):
    """``carry = body(layer, carry)`` for each decoder layer in order, where ``layer(*args)`` applies
    that layer (as ``apply_layer``; ``body`` may call it several times).

    With ``cfg.scan_layers`` (apply mode) the layers' variables are stacked ``[num_layers, ...]`` and
    one ``lax.scan`` runs ``body``: traced and compiled once instead of ``num_layers`` times (the
    update's compile time and compiled-program size shrink accordingly; MaxText's ``scan_layers``).
    The same ops per layer; the stacked copy of the variables costs their size while it lives."""
    if module.is_initializing() or not cfg.scan_layers:
        for i in range(cfg.num_layers):
            carry = body(functools.partial(apply_layer, module, cfg, lora_scale, i), carry)
        return carry
    split = [_trained_and_frozen(_layer_variables(module, f"layers_{i}")) for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *split)
    fn = _layer_fn(cfg, lora_scale)

    def step(c, layer_vars):
        trained, frozen = layer_vars
        return body(functools.partial(fn, trained, frozen), c), None

    carry, _ = jax.lax.scan(step, carry, stacked)
    return carry


class Transformer(nn.Module):
    """The full LM. Inputs are already-prepared positions and a boolean `[B, T, S]` mask."""

    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, mask_bts, logits_at_bk=None, head_inputs=False):
        cfg = self.config
        embed = embedding(cfg)
        x = embed(tokens_bt)
        cos, sin = layers.rope_cos_sin(positions_bt, cfg)
        # remat: each layer's backward recomputes its forward from the layer input (same values),
        # so only the layer inputs stay alive between the passes (`tied_remat`).
        x = run_layers(self, cfg, self.lora_scale, lambda layer, x: layer(x, cos, sin, mask_bts)[0], x)
        return lm_head(self, cfg, embed, x, logits_at_bk, head_inputs)


def embedding(cfg: ModelConfig) -> nn.Embed:
    """The `embed_tokens` module (create inside a compact `__call__`)."""
    return nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=nn.initializers.normal(0.02),
        name="embed_tokens",
    )


class HeadInputs(NamedTuple):
    """The vocabulary projection, not yet applied: `logits = hidden_bkh @ W` (float32), where W is
    `weight [H, V]`, or `weight [V, H]` transposed when the head is tied to the embedding (no
    transposed copy is formed). Returned by the training forwards (`head_inputs=True`) so a loss can
    project the positions it needs a chunk at a time (`rl.losses.sparse_token_logprobs_and_entropy`):
    the `[B, K, V]` float32 logits and their log-softmax never exist whole. Lives inside one trace
    (`tied` is a Python bool, not a traced leaf)."""

    hidden_bkh: jnp.ndarray  # the final-normed hidden states at the requested positions
    weight: jnp.ndarray
    tied: bool

    def logits(self, hidden_bkh: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """float32 logits `[..., V]` of `hidden_bkh` (default: all of `self.hidden_bkh`)."""
        x = self.hidden_bkh if hidden_bkh is None else hidden_bkh
        w = self.weight.astype(x.dtype)
        return matmul_2d(x, w.T if self.tied else w).astype(jnp.float32)  # tied: = embed.attend(x), 2-D


def head_chunks(k: int, chunk_size: int) -> tuple[int, int]:
    """(n, c): K loss positions projected in n equal chunks of c <= `chunk_size` positions (K padded by
    n * c - K < n); (1, K) for `chunk_size` 0 or >= K. `rl.losses.head_logprobs_and_entropy` and the
    memory plan use it."""
    if not chunk_size or chunk_size >= k:
        return 1, k
    n = -(-k // int(chunk_size))
    return n, -(-k // n)


def lm_head(module: nn.Module, cfg: ModelConfig, embed: nn.Embed, x_btd, logits_at_bk=None, head_inputs: bool = False):
    """Final norm + vocabulary projection of the last hidden states `[B, T, hidden]` (only at
    `logits_at_bk [B, K]` when given): float32 logits, or with `head_inputs` the `HeadInputs` (apply
    mode only). Call inside `module`'s compact `__call__`."""
    x = RMSNorm(cfg, name="norm")(x_btd)
    if logits_at_bk is not None:  # project only the positions the caller needs
        x = jnp.take_along_axis(x, logits_at_bk[..., None].astype(jnp.int32), axis=1)
    if cfg.tie_word_embeddings:
        head = HeadInputs(x, embed.embedding, tied=True)
    elif module.is_initializing():
        return Proj(cfg, cfg.vocab_size, name="lm_head")(x).astype(jnp.float32)
    else:  # the same product as Proj (no bias, never a LoRA target), from its variable
        head = HeadInputs(x, module.variables["params"]["lm_head"]["kernel"], tied=False)
    return head if head_inputs else head.logits()


# ---------------------------------------------------------------------------- pure forward
def model_variables(params: Params, adapter: Optional[Adapter]) -> tuple[dict[str, Any], float]:
    """The Linen variables (`params`, plus the `lora` collection) and the LoRA scale for `adapter`."""
    if adapter is None:
        return {"params": params}, 1.0
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be a rema_jax.models.adapters.Adapter or None, got {type(adapter)}")
    if adapter.kind == "full":
        return {"params": adapter.weights}, 1.0
    if adapter.kind == "lora":
        return {"params": params, "lora": adapter.weights}, float(adapter.scale)
    raise ValueError(f"unknown adapter kind {adapter.kind!r}")


def forward(
    config: ModelConfig,
    params: Params,
    tokens_bt: jnp.ndarray,
    adapter: Optional[Adapter] = None,
    *,
    positions_bt: Optional[jnp.ndarray] = None,
    attention_mask: Optional[jnp.ndarray] = None,
    logits_at_bk: Optional[jnp.ndarray] = None,
    head_inputs: bool = False,
) -> jnp.ndarray | HeadInputs:
    """Logits `[B, T, V]` (float32) for `tokens_bt [B, T]`, causal over the whole block (no KV cache;
    cached decoding is `rema_jax.sampling`, tested against this function).

    Args:
      config: static model config (use as a `jax.jit` static argument).
      params: the base parameter tree (Contract 1). Never copied.
      adapter: an `Adapter` (`lora` adds low-rank terms, `full` replaces `params`) or None (the base).
      positions_bt: rotary positions. Default: `cumsum(attention_mask) - 1`, so a left-padded row gives
        the same logits as the unpadded row.
      attention_mask: `[B, T]`, 1 = real token; 0-slots are never attended to.
      logits_at_bk: optional `[B, K]` time indices; the vocabulary projection then runs only there and
        the result is `[B, K, V]` (RL losses need logits at the response tokens only, and the projection
        plus log-softmax over every prompt position dominates the cost for large vocabularies).
      head_inputs: return the `HeadInputs` (final hidden states at `logits_at_bk` and the head weight)
        instead of the logits, for a loss that projects them in chunks.
    """
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens_bt must be [batch, time], got shape {tokens_bt.shape}")
    b, t = tokens_bt.shape
    variables, lora_scale = model_variables(params, adapter)

    mask_bt = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if mask_bt.shape != (b, t):
        raise ValueError(f"attention_mask must be [batch, time]={(b, t)}, got {mask_bt.shape}")
    causal_ts = jnp.tril(jnp.ones((t, t), bool))
    mask_bts = causal_ts[None] & mask_bt[:, None, :]
    if positions_bt is None:
        positions_bt = (
            jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if attention_mask is None
            else jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)
        )
    return Transformer(config, lora_scale).apply(
        variables, tokens_bt, positions_bt, mask_bts, logits_at_bk, head_inputs
    )
