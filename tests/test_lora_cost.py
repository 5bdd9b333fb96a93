"""Matmul work of the LoRA RL update: no weight gradients for the frozen base, FLOPs within the LoRA budget.

Counts `dot_general` ops in the traced update (jaxpr, so backend independent and deterministic; no
timing). The frozen base is passed the way the trainer passes it (`constants`, not differentiated);
a regression that differentiates it again (or asks for gradients of the whole tree) shows up as
dots whose output has a base kernel's shape and as FLOPs over the budget
`4 N tokens + 6 N_lora tokens + attention` (what the model needs: forward, input gradients through
the frozen weights, both LoRA factor products; the count is exact, so any extra matmul work fails).
The full update is the positive control: the same checks must flag it.
"""

import math

import jax
import jax.extend.core as jex
import numpy as np
import pytest

from rema_jax import rl
from rema_jax.models import Adapter, AdapterConfig, forward, init_adapter, param_shapes
from rema_jax.models.testing import random_params, tiny_config

B, T, RANK = 2, 20, 4  # B * T = 40 tokens: no kernel dimension is 40, so activations never look like kernels
K = T - T // 4  # loss positions per row (the prompt is the first quarter)


def _config(tied: bool):
    # Distinct sizes (q 48, kv 24, ffn 80, vocab 160) so every kernel shape is recognisable.
    return tiny_config(
        hidden_size=48,
        intermediate_size=80,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        vocab_size=160,
        tie_word_embeddings=tied,
    )


def _batch(config):
    rng = np.random.default_rng(0)
    loss = np.ones((B, T), np.float32)
    loss[:, : T // 4] = 0.0
    return {
        "tokens": rng.integers(3, config.vocab_size, (B, T)).astype(np.int32),
        "attention_mask": np.ones((B, T), np.int32),
        "loss_mask": loss,
        "turn_ids": np.where(loss > 0, 0, -1).astype(np.int32),
        "advantages": (rng.standard_normal((B, 1)) * loss).astype(np.float32),
        "old_logprobs": (-2.0 * loss).astype(np.float32),
    }


def _update_jaxpr(config, mode: str, logits: str):
    """The jaxpr of one `rl.make_update_fn` step: `lora` (base in `constants`, like the trainer) or `full`."""
    params = random_params(config, jax.random.key(0))
    opt = rl.MultiAgentOptimizer(rl.OptimizerConfig(learning_rate=1e-3))
    loss_cfg = rl.LossConfig(max_turns=1)
    if mode == "lora":
        weights = init_adapter(config, params, AdapterConfig(rank=RANK, alpha=2.0 * RANK), jax.random.key(1)).weights
        agents, consts, trained = {"reasoning": weights}, {"base": params}, ("reasoning",)

        def model(p, batch, logits_at=None):
            adapter = Adapter(weights=p["reasoning"], kind="lora", scale=2.0)
            return forward(
                config, p["base"], batch.tokens, adapter, attention_mask=batch.attention_mask, logits_at_bk=logits_at
            )
    else:
        agents, consts, trained = {"shared": params}, {}, ("shared",)

        def model(p, batch, logits_at=None):
            return forward(
                config, p["shared"], batch.tokens, attention_mask=batch.attention_mask, logits_at_bk=logits_at
            )

    if logits == "dense":
        update = rl.make_update_fn(lambda p, role, b: model(p, b), loss_cfg, opt)
    else:  # the trainer's path: logits at the loss positions only

        def logprobs_fn(p, role, b):
            return rl.sparse_token_logprobs_and_entropy(
                lambda pos: model(p, b, pos), b.tokens, b.loss_mask, K, loss_cfg.temperature
            )

        update = rl.make_update_fn(None, loss_cfg, opt, logprobs_fn=logprobs_fn)
    state = rl.init_rl_state(agents, opt)
    batches = {"reasoning": _batch(config)}
    return jax.make_jaxpr(lambda s, b, c: update.jitted(s, b, trained, c))(state, batches, consts).jaxpr


def _dots(jaxpr, mult: int = 1):
    """(eqn, times executed) for every dot_general, descending into pjit / scan / custom-vjp bodies."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn, mult
        inner = mult * int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else mult
        for sub in jex.jaxprs_in_params(eqn.params):
            yield from _dots(sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub, inner)


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _kernel_shapes(config) -> set:
    """Every 2-D base weight shape and its transpose (an XLA layout may produce either)."""
    leaves = jax.tree.leaves(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    return {s for shape in leaves if len(shape) == 2 for s in (tuple(shape), tuple(shape[::-1]))}


def _budget(config, lora: bool, logit_rows: int) -> float:
    """Matmul FLOPs of a forward + backward: 6 N n (full) or 4 N n + 6 N_lora n (LoRA), plus attention
    (`n` tokens, N / N_lora the matmul weights / LoRA factors; the vocabulary projection on `logit_rows`)."""
    h, f, hd, n = config.hidden_size, config.intermediate_size, config.head_dim, B * T
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    layer = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    n_layers = config.num_layers * sum(i * o for i, o in layer)
    n_lora = config.num_layers * sum(RANK * (i + o) for i, o in layer)
    head = h * config.vocab_size * logit_rows  # the vocabulary projection runs on logit_rows rows
    attention = 12 * config.num_layers * config.num_heads * hd * T * n
    per_pass = 2 * (n_layers * n + head)  # one forward (or one backward product): 2 FLOPs per multiply-add
    if not lora:
        return 3 * per_pass + attention
    # Layer 0's q/k/v input is a function of the frozen embedding only: no input gradient there.
    no_dx = 2 * n * h * (q + 2 * kv) + 3 * 2 * n * RANK * h
    return 2 * per_pass + 6 * n_lora * n + attention - no_dx


@pytest.mark.parametrize("tied,logits", [(True, "dense"), (False, "sparse")])
def test_lora_update_has_no_base_weight_gradients(tied, logits):
    config = _config(tied)
    kernels = _kernel_shapes(config)
    lora = list(_dots(_update_jaxpr(config, "lora", logits)))
    full = list(_dots(_update_jaxpr(config, "full", logits)))
    dw = lambda dots: sorted({e.outvars[0].aval.shape for e, _ in dots if e.outvars[0].aval.shape in kernels})  # noqa: E731
    assert dw(lora) == [], f"the LoRA update computes base-kernel-shaped matmuls (weight gradients): {dw(lora)}"
    assert len(dw(full)) >= 4, "positive control: the full update's weight gradients must be detected"

    rows = B * T if logits == "dense" else B * K  # sparse: the vocabulary projection at K positions per row
    lora_flops = sum(m * _dot_flops(e) for e, m in lora)
    full_flops = sum(m * _dot_flops(e) for e, m in full)
    assert lora_flops <= 1.001 * _budget(config, True, rows), (lora_flops, _budget(config, True, rows))
    assert full_flops > 1.05 * _budget(config, True, rows), "positive control: full must exceed the LoRA budget"
    assert full_flops <= 1.001 * _budget(config, False, rows), (full_flops, _budget(config, False, rows))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_weight_gradients_contract_one_token_axis(mode):
    """A dot without batch dims (a projection or its gradient) contracts one axis: activations are
    flattened to [tokens, features] first. Contracting (batch, time) made XLA:CPU transpose `dy` with
    a strided copy per matmul, which cost a LoRA update as much as the rank-r matmuls saved."""
    for eqn, _ in _dots(_update_jaxpr(_config(True), mode, "dense")):
        (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
        if not lb:
            assert len(lc) == 1, (
                f"dot_general {eqn.invars[0].aval.shape} x {eqn.invars[1].aval.shape} contracts {lc}/{rc}"
            )
