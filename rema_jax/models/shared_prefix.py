"""The training forward with shared prefixes: each unique prefix runs once, its rows run the rest.

Rows that start with the same tokens (a question's prompt, a plan the reasoning agent answers) are
given as U unique prefixes `[U, P]` plus one suffix per row `[B, S]` (`rema_jax.rl.prefix_plan`).
Layer by layer, the prefixes run causally on their own; each prefix's rotated keys and values are
gathered to its rows; the suffixes attend to those keys (positions below the row's `prefix_len`)
and causally to their own. The layer modules (and so LoRA, full and shared agents) are the ones of
`transformer.forward`, called twice with the same parameters. The gradient of the gather is a
scatter-add: each prefix's activations get the sum of its rows' gradients, computed once.

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
    """`Transformer`'s parameters, run on prefixes `[U, P]` and suffixes `[B, S]`."""

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
    ):
        cfg = self.config
        u, p = prefix_tokens_up.shape
        b, s = suffix_tokens_bs.shape
        prefix_ok_up = prefix_mask_up.astype(bool)
        mask_upp = jnp.tril(jnp.ones((p, p), bool))[None] & prefix_ok_up[:, None, :]
        row_prefix_ok_bp = prefix_ok_up[row_prefix_b] & (jnp.arange(p)[None] < prefix_len_b[:, None])
        suffix_ok_bss = jnp.tril(jnp.ones((s, s), bool))[None] & suffix_mask_bs.astype(bool)[:, None, :]
        mask_bs_ps = jnp.concatenate([jnp.broadcast_to(row_prefix_ok_bp[:, None, :], (b, s, p)), suffix_ok_bss], axis=2)

        pos_up = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (u, p))
        pos_bs = prefix_len_b[:, None].astype(jnp.int32) + jnp.arange(s, dtype=jnp.int32)[None]
        cos_up, sin_up = layers.rope_cos_sin(pos_up, cfg)
        cos_bs, sin_bs = layers.rope_cos_sin(pos_bs, cfg)

        embed = embedding(cfg)
        x_up, x_bs = embed(prefix_tokens_up), embed(suffix_tokens_bs)

        def body(layer, carry):
            x_up, x_bs = carry
            x_up_next, (k_up, v_up) = layer(x_up, cos_up, sin_up, mask_upp)
            kv_bp = (k_up[row_prefix_b], v_up[row_prefix_b])
            x_bs, _ = layer(x_bs, cos_bs, sin_bs, mask_bs_ps, kv_bp)
            return x_up_next, x_bs  # the last layer's prefix output is unused (only its keys/values are)

        _, x_bs = run_layers(self, cfg, self.lora_scale, body, (x_up, x_bs))
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
    )
