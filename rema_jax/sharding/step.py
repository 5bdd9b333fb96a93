"""The RL update step under a mesh, with explicit input and output shardings.

`rema_jax.rl.make_update_fn` builds a plain `jax.jit`; here it is wrapped in an outer `jax.jit` whose
`in_shardings`/`out_shardings` come from the `ShardingPlan`: the state (per-agent adapters or params
and their AdamW states) keeps its rule-given layout across steps, the rollout batch is split over
`data`×`fsdp`, metrics come back replicated. The inner jit is inlined, so this is one executable.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from rema_jax.sharding.rules import ShardingPlan


def shard_update_fn(
    update_fn: Callable,
    plan: ShardingPlan,
    state: Any,
    batches: Mapping[str, Any],
    trained: Sequence[str],
    constants: Optional[Mapping[str, Any]] = None,
    *,
    donate_state: bool = False,
):
    """`step(state, batches, constants) -> (new_state, metrics)` for one phase (`trained` agents),
    compiled for the shapes of `state`/`batches`/`constants` with the plan's shardings.

    `constants`: frozen trees the logits function reads (e.g. `{"base": params}` under LoRA), passed
    as sharded arguments (not closed over, which would replicate them into the executable).

    `update_fn`: what `rema_jax.rl.make_update_fn` returns (its `.jitted` core is used; the host-side
    batch checks of `update_fn` should run once on the first batch, e.g. on the main process).
    Place the state first with `plan.put(state)` and batches with `plan.batch_shardings` /
    `distributed.global_batch_from_host`.
    """
    core = getattr(update_fn, "jitted", None)
    if core is None:
        raise TypeError(
            "shard_update_fn needs the function returned by rema_jax.rl.make_update_fn "
            "(it exposes the jitted core as `.jitted`)"
        )
    trained = tuple(trained)
    state_sh = plan.tree_shardings(state)
    batch_sh = plan.batch_shardings(batches)
    const_sh = plan.tree_shardings(dict(constants or {}))

    def step(s, b, c):
        return core(s, b, trained, c)

    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, const_sh),
        out_shardings=(state_sh, plan.replicated()),
        donate_argnums=(0,) if donate_state else (),
    )

    def run(s, b, c=None):
        return jitted(s, b, dict(c or {}))

    run.jitted = jitted
    return run


def shard_logprobs_fn(logprobs_fn: Callable, plan: ShardingPlan, params: Any, batch: Mapping[str, Any], role: str):
    """`fn(params, batch) -> logp_bt [B, T]` for one `role`: `rema_jax.rl.compute_logprobs_fn`'s jitted
    core under the mesh, params laid out by the rules, batch rows and the output split over `data`×`fsdp`.

    Compiled for the shapes of `params`/`batch` (pass the placed trees; `batch` is a `TrainBatch` with
    the Contract-4 fields `tokens, attention_mask, loss_mask, turn_ids`).
    """
    core = getattr(logprobs_fn, "jitted", None)
    if core is None:
        raise TypeError(
            "shard_logprobs_fn needs the function returned by rema_jax.rl.compute_logprobs_fn "
            "(it exposes the jitted core as `.jitted`)"
        )
    tokens = batch.tokens if hasattr(batch, "tokens") else batch.get("tokens")
    if tokens is None:
        raise ValueError(f"shard_logprobs_fn: batch for role {role!r} has no 'tokens'")
    out_sh = plan._named(plan.batch_spec(tokens.shape, f"{role}/logprobs"))
    jitted = jax.jit(
        lambda p, b: core(p, role, b),
        in_shardings=(plan.tree_shardings(params), plan.batch_shardings(batch)),
        out_shardings=out_sh,
    )

    def run(p, b):
        return jitted(p, b)

    run.jitted = jitted
    return run
