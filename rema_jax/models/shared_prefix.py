"""The training forward with shared prefixes: each unique prefix runs once, its rows run the rest.

Rows that start with the same tokens (a question's prompt, a plan the reasoning agent answers) are
given as U unique prefixes `[U, P]` plus one suffix per row `[B, S]` (`rema_jax.rl.prefix_plan`).
Layer by layer, the prefixes run causally on their own; each prefix's rotated keys and values are
gathered to its rows; the suffixes attend to those keys (positions below the row's `prefix_len`)
and causally to their own. The layer modules (and so LoRA, full and shared agents) are the ones of
`transformer.forward`, called twice with the same parameters. The gradient of the gather is a
scatter-add: each prefix's activations get the sum of its rows' gradients, computed once.

Nested plans add outer prefixes `[G, R]` (what a group of prefixes shares, e.g. the system prompt and
question before the reasoning agent's plans): each runs once, the prefixes attend to their outer
prefix's keys and values, and the suffixes to both (`rl.prefix_plan`).

Same logits as `forward` on the whole rows at the suffix positions, up to the order of float sums.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from rema_jax.models import layers
from rema_jax.models.adapters import Adapter
from rema_jax.models.config import ModelConfig
from rema_jax.models.layers import Params
from rema_jax.models.transformer import HeadInputs, embedding, lm_head, model_variables, run_layers


class SharedPrefixTransformer(nn.Module):
    """`Transformer`'s parameters, run on prefixes `[U, P]` and suffixes `[B, S]` (and, nested, on
    outer prefixes `[G, R]` that the prefixes continue)."""

    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(
        self,
        prefix_tokens_up,
        prefix_mask_up,
        row_prefix_b,
        prefix_len_b,
        suffix_tokens_bs,
        suffix_mask_bs,
        logits_at_bk,
        head_inputs=False,
        outer_tokens_gr=None,
        outer_len_g=None,
        prefix_outer_u=None,
    ):
        cfg = self.config
        u, p = prefix_tokens_up.shape
        b, s = suffix_tokens_bs.shape
        prefix_ok_up = prefix_mask_up.astype(bool)
        nested = outer_tokens_gr is not None
        mask_upp = jnp.tril(jnp.ones((p, p), bool))[None] & prefix_ok_up[:, None, :]
        start_u = jnp.zeros((u,), jnp.int32)  # prefix u's first position
        past_ok = []  # per row, the keys before its suffix: [outer R +] prefix P
        if nested:  # outer prefix g: causal over its r_g tokens; prefix u starts at position r_{g(u)}
            g, r = outer_tokens_gr.shape
            outer_ok_gr = jnp.arange(r)[None] < outer_len_g[:, None]
            mask_grr = jnp.tril(jnp.ones((r, r), bool))[None] & outer_ok_gr[:, None, :]
            start_u = outer_len_g[prefix_outer_u]
            outer_ok_upr = jnp.broadcast_to(outer_ok_gr[prefix_outer_u][:, None, :], (u, p, r))
            mask_upp = jnp.concatenate([outer_ok_upr, mask_upp], axis=2)
            outer_of_b = prefix_outer_u[row_prefix_b]
            # rows without a prefix (prefix_len 0) see no outer tokens
            past_ok.append(outer_ok_gr[outer_of_b] & (prefix_len_b > 0)[:, None])
        row_start_b = start_u[row_prefix_b]
        past_ok.append(prefix_ok_up[row_prefix_b] & (jnp.arange(p)[None] < (prefix_len_b - row_start_b)[:, None]))
        past_ok_bk = past_ok[0] if len(past_ok) == 1 else jnp.concatenate(past_ok, axis=1)
        suffix_ok_bss = jnp.tril(jnp.ones((s, s), bool))[None] & suffix_mask_bs.astype(bool)[:, None, :]
        past_ok_bsk = jnp.broadcast_to(past_ok_bk[:, None, :], (b, s, past_ok_bk.shape[1]))
        mask_bs_ks = jnp.concatenate([past_ok_bsk, suffix_ok_bss], axis=2)

        pos_up = start_u[:, None].astype(jnp.int32) + jnp.arange(p, dtype=jnp.int32)[None]
        pos_bs = prefix_len_b[:, None].astype(jnp.int32) + jnp.arange(s, dtype=jnp.int32)[None]
        cos_up, sin_up = layers.rope_cos_sin(pos_up, cfg)
        cos_bs, sin_bs = layers.rope_cos_sin(pos_bs, cfg)

        embed = embedding(cfg)
        x_up, x_bs = embed(prefix_tokens_up), embed(suffix_tokens_bs)

        x_gr = cos_gr = sin_gr = None
        if nested:
            cos_gr, sin_gr = layers.rope_cos_sin(jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (g, r)), cfg)
            x_gr = embed(outer_tokens_gr)

        def body(layer, carry):
            x_gr, x_up, x_bs = carry
            past_u, past_b = None, []  # the prefixes' and the suffixes' earlier keys/values
            if nested:
                x_gr, (k_gr, v_gr) = layer(x_gr, cos_gr, sin_gr, mask_grr)
                past_u = (k_gr[prefix_outer_u], v_gr[prefix_outer_u])
                past_b.append((k_gr[outer_of_b], v_gr[outer_of_b]))
            x_up_next, (k_up, v_up) = layer(x_up, cos_up, sin_up, mask_upp, past_u)
            past_b.append((k_up[row_prefix_b], v_up[row_prefix_b]))
            kv_b = tuple(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1) for parts in zip(*past_b))
            x_bs, _ = layer(x_bs, cos_bs, sin_bs, mask_bs_ks, kv_b)
            return x_gr, x_up_next, x_bs  # the last layer's prefix outputs are unused (only their keys/values are)

        _, _, x_bs = run_layers(self, cfg, self.lora_scale, body, (x_gr, x_up, x_bs))
        return lm_head(self, cfg, embed, x_bs, logits_at_bk, head_inputs)


def forward_shared_prefix(
    config: ModelConfig,
    params: Params,
    prefix,
    adapter: Optional[Adapter] = None,
    *,
    logits_at_bk: Optional[jnp.ndarray] = None,
    head_inputs: bool = False,
) -> jnp.ndarray | HeadInputs:
    """Logits `[B, S, V]` (float32; `[B, K, V]` at suffix positions `logits_at_bk`) of the rows of a
    `rema_jax.rl.PrefixPlan` chunk `prefix` (`prefix_tokens [U, P]`, `row_prefix [B]`, ...), or their
    `HeadInputs` with `head_inputs` (as `forward`).

    Suffix position `j` of row `b` is the row's position `prefix_len[b] + j`: the same logits as
    `forward(config, params, tokens_bt, adapter, attention_mask=...)` there. `params` / `adapter` as
    in `forward`.
    """
    variables, lora_scale = model_variables(params, adapter)
    return SharedPrefixTransformer(config, lora_scale).apply(
        variables,
        jnp.asarray(prefix.prefix_tokens),
        jnp.asarray(prefix.prefix_mask),
        jnp.asarray(prefix.row_prefix),
        jnp.asarray(prefix.prefix_len),
        jnp.asarray(prefix.suffix_tokens),
        jnp.asarray(prefix.suffix_mask),
        logits_at_bk,
        head_inputs,
        *(None if x is None else jnp.asarray(x) for x in (prefix.outer_tokens, prefix.outer_len, prefix.prefix_outer)),
    )
