"""One jitted RL update: mini-batches x micro-batches, gradient accumulation, masked step.

`logprobs_fn(params, role, batch) -> (logp_bt, entropy_bt)` (or `logits_fn(params, role, batch) ->
logits_btv`) is supplied by the caller (the learner builds it from `rema_jax.models.forward`, picking
the role's adapter); `role` is a static string and `batch` a `TrainBatch` with its model fields.

A rollout batch is `{role: TrainBatch}` (`rema_jax.rl.batch`; mappings with the same field names are
accepted) with tokens, attention_mask, loss_mask, turn_ids, advantages, old_logprobs[, ref_logprobs],
all [B_role, T]. Each role's rows are split into `num_mini_batches` optimizer steps, each into
`num_micro_batches` accumulation steps (B_role must be divisible by their product). Loss
denominators are counted over each whole mini-batch across all its roles, so the accumulated
loss equals the loss of the merged mini-batch (the official shared-weights merge).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax.rl import losses
from rema_jax.rl.batch import TrainBatch, as_train_batch
from rema_jax.rl.optimizer import MultiAgentOptimizer, check_trained

LogitsFn = Callable[[Mapping[str, Any], str, TrainBatch], jax.Array]
LogprobsFn = Callable[[Mapping[str, Any], str, TrainBatch], tuple[jax.Array, jax.Array]]
"""`logprobs_fn(params, role, batch) -> (logp_bt, entropy_bt)`, Contract 4 aligned: an alternative
to `logits_fn` for callers that compute log-probs more cheaply (e.g. only at loss positions with
`losses.sparse_token_logprobs_and_entropy`)."""


def _as_logprobs_fn(
    logits_fn: LogitsFn | None, logprobs_fn: LogprobsFn | None, temperature: float, chunk_size: int | None
) -> LogprobsFn:
    if (logits_fn is None) == (logprobs_fn is None):
        raise ValueError("pass exactly one of logits_fn and logprobs_fn")
    if logprobs_fn is not None:
        return logprobs_fn

    def from_logits(params, role, batch):
        logits = logits_fn(params, role, batch)
        return losses.token_logprobs_and_entropy(logits, batch.tokens, temperature, chunk_size=chunk_size)

    return from_logits


OLD_LOGPROB_SOURCES = ("auto", "recompute", "in_update")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """num_mini_batches: optimizer steps per rollout batch (paper: 4; official example: 1).
    num_micro_batches: gradient-accumulation steps per mini-batch (memory only).
    share_prefix: the learner's update and old / reference log-prob passes compute a token prefix
    that rows share once per micro-batch (`rl.plan_prefix`, `models.forward_shared_prefix`); same
    results as off up to float rounding. The mesh path always runs the plain passes.
    old_logprobs: where log π_old comes from.
      "recompute": a log-prob pass over the rows before the update (the official code's order);
        the batch must carry ``old_logprobs``.
      "in_update": with one mini-batch the update's only optimizer step is taken at the rollout's
        parameters, so its own forward already computes log π_old: a batch without
        ``old_logprobs`` uses ``stop_gradient(log π_θ)``. The ratio is then exactly 1 and its
        gradient is ∇log π_θ, as with the recomputed values up to float rounding; the pass is
        skipped. Needs ``num_mini_batches == 1``.
      "auto" (default): "in_update" when ``num_mini_batches == 1``, else "recompute". (The trainer
        still runs the pass when an advantage estimator reads π_old before the update.)"""

    num_mini_batches: int = 1
    num_micro_batches: int = 1
    share_prefix: bool = True
    old_logprobs: str = "auto"

    def __post_init__(self):
        for name in ("num_mini_batches", "num_micro_batches"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"UpdateConfig.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.share_prefix, bool):
            raise ValueError(f"UpdateConfig.share_prefix must be a bool, got {self.share_prefix!r}")
        if self.old_logprobs not in OLD_LOGPROB_SOURCES:
            raise ValueError(
                f"UpdateConfig.old_logprobs must be one of {OLD_LOGPROB_SOURCES}, got {self.old_logprobs!r}"
            )
        if self.old_logprobs == "in_update" and self.num_mini_batches != 1:
            raise ValueError(
                f"UpdateConfig.old_logprobs='in_update' needs num_mini_batches == 1 (got {self.num_mini_batches}): "
                "every mini-batch after the first is taken at updated parameters; use 'auto' or 'recompute'"
            )

    @property
    def old_from_update(self) -> bool:
        """Whether a batch without ``old_logprobs`` takes log π_old from the update's own forward."""
        return self.old_logprobs != "recompute" and self.num_mini_batches == 1


class RLState(NamedTuple):
    """params: {agent: tree or None}; opt_state: {agent: AdamW state or None}."""

    params: dict
    opt_state: dict


def init_rl_state(params: Mapping[str, Any], optimizer: MultiAgentOptimizer) -> RLState:
    return RLState(params=dict(params), opt_state=optimizer.init(params))


def _check_turn_ids(batch: Mapping[str, Any], role: str, max_turns: int):
    tid, mask = batch.turn_ids, batch.loss_mask
    if isinstance(tid, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    tid, mask = np.asarray(tid), np.asarray(mask)
    bad = (mask > 0) & ((tid < 0) | (tid >= max_turns))
    if bad.any():
        raise ValueError(
            f"batch[{role!r}]: {int(bad.sum())} loss tokens have turn_ids outside [0, max_turns="
            f"{max_turns}) (max seen {int(tid.max())}); raise LossConfig.max_turns"
        )


def _split(x, m: int, u: int):
    """[N, ...] -> [m, u, N / (m u), ...]."""
    n = x.shape[0]
    if n % (m * u):
        raise ValueError(f"{n} rows are not divisible by num_mini_batches * num_micro_batches = {m * u}")
    return x.reshape((m, u, n // (m * u)) + x.shape[1:])


# Per-role loss metrics that are each micro-batch's share of the mini-batch loss (normalised by
# whole-mini-batch denominators), and the behaviour-gap sums: they add up over micro-batches; every
# other metric averages.
_GAP_SUM, GAP_COUNT, GAP = "behaviour_gap_sum", "behaviour_gap_count", "behaviour_logprob_gap"
_ADDITIVE_OVER_MICRO = ("pg_loss", "loss", _GAP_SUM, GAP_COUNT)


def _merge_metrics(stacked: dict, *, micro: bool = False) -> dict:
    """Merge metrics over the leading axis: '_max' keys take the max; over micro-batches the
    per-role loss shares add up (``micro=True``); everything else is averaged."""

    def merge(k, v):
        if k.endswith("_max"):
            return jnp.max(v)
        if micro and k.rsplit("/", 1)[-1] in _ADDITIVE_OVER_MICRO:
            return jnp.sum(v)
        return jnp.mean(v)

    return {k: merge(k, v) for k, v in stacked.items()}


def make_update_fn(
    logits_fn: LogitsFn | None,
    loss_cfg: losses.LossConfig,
    optimizer: MultiAgentOptimizer,
    update_cfg: UpdateConfig = UpdateConfig(),
    *,
    donate_state: bool = False,
    logprobs_fn: LogprobsFn | None = None,
):
    """Build `update(state, batches, trained) -> (new_state, metrics)`.

    `trained` (tuple of agent names, e.g. ("reasoning",) or ("shared",)) is static: one
    compilation per phase, none between steps of the same shapes. Metrics are scalars:
    "<role>/<loss metric>" averaged over micro/mini-batches, plus "loss", "grad_norm", "lr",
    "finite"; with behaviour log-probs in a role's batch, "<role>/behaviour_logprob_gap" (mean
    |behaviour − π_old| over its drawn loss tokens) and "<role>/behaviour_gap_count" (their number).
    When any mini-batch has a non-finite loss or gradient, the returned state is the input state
    unchanged and metrics["finite"] is False. With `donate_state` the input state's
    buffers are donated (do not reuse it after the call).
    """
    m, u = update_cfg.num_mini_batches, update_cfg.num_micro_batches
    need_ref = loss_cfg.kl_coef > 0

    lp_fn = _as_logprobs_fn(logits_fn, logprobs_fn, loss_cfg.temperature, loss_cfg.logprob_chunk_size)

    def role_loss(params, role, mb: TrainBatch, norms):
        logp, ent = lp_fn(params, role, mb.model_inputs())
        old = mb.old_logprobs
        if old is None:
            if not update_cfg.old_from_update:  # (check_update_batch says so first, on the host)
                raise ValueError(f"batch[{role!r}] has no old_logprobs and {update_cfg} needs them")
            old = jax.lax.stop_gradient(logp) * (mb.loss_mask > 0)  # π_old = π_θ before the only step
        loss, met = losses.ppo_loss(
            logp,
            old,
            mb.advantages,
            mb.loss_mask,
            mb.turn_ids,
            loss_cfg,
            entropy_bt=ent,
            ref_logp_bt=mb.ref_logprobs,
            normalizers=norms,
        )
        if mb.behaviour_logprobs is not None:  # |sampler − training graph| on the drawn loss tokens
            drawn = mb.behaviour_mask * (mb.loss_mask > 0)
            gap = jnp.abs(mb.behaviour_logprobs - jax.lax.stop_gradient(old)) * drawn
            met = {**met, _GAP_SUM: jnp.sum(gap), GAP_COUNT: jnp.sum(drawn)}
        return loss, met

    def core(state: RLState, batches: dict, trained: tuple, constants: dict):
        # {role: TrainBatch} (mappings accepted, e.g. from the mesh helpers); no ref without a KL term
        batches = {r: as_train_batch(b) for r, b in batches.items()}
        if not need_ref:
            batches = {r: b.replace(ref_logprobs=None) for r, b in batches.items()}
        roles = tuple(sorted(batches))
        frozen = {**constants, **{a: p for a, p in state.params.items() if a not in trained}}
        split = {r: jax.tree_util.tree_map(lambda x: _split(jnp.asarray(x), m, u), b) for r, b in batches.items()}

        def micro_loss(trained_params, micro, norms):
            params = {**frozen, **trained_params}
            total, metrics = 0.0, {}
            for r in roles:
                loss_r, met_r = role_loss(params, r, micro[r], norms)
                total = total + loss_r
                metrics.update({f"{r}/{k}": v for k, v in met_r.items()})
            return total, metrics

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def mini_step(carry, mini):
            params, opt_state = carry
            norms = {"tokens": 0.0, "turns": 0.0, "seqs": 0.0}
            for r in roles:  # denominators over the whole mini-batch, all roles
                flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), mini[r])
                n_r = losses.loss_normalizers(flat.loss_mask, flat.turn_ids, loss_cfg.max_turns)
                norms = {k: norms[k] + n_r[k] for k in norms}
            trained_params = {a: params[a] for a in trained}

            def micro_step(acc, micro):
                (loss, met), g = grad_fn(trained_params, micro, norms)
                acc_g, acc_loss = acc
                acc_g = jax.tree_util.tree_map(jnp.add, acc_g, g)
                return (acc_g, acc_loss + loss), met

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trained_params)
            (grads, loss), met = jax.lax.scan(
                micro_step, (zeros, jnp.zeros((), jnp.float32)), mini
            )  # scans the micro axis of [u, b, T]
            new_params, new_opt, step_met = optimizer.step(grads, opt_state, params, trained)
            finite = jnp.isfinite(loss) & jnp.isfinite(step_met["grad_norm"])
            keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
                lambda a, b: jnp.where(finite, a, b), new, old
            )
            params_out = {**params, **keep({a: new_params[a] for a in trained}, {a: params[a] for a in trained})}
            opt_out = {**opt_state, **keep({a: new_opt[a] for a in trained}, {a: opt_state[a] for a in trained})}
            met = _merge_metrics(met, micro=True)
            met.update(loss=loss, finite=finite.astype(jnp.float32), **step_met)
            return (params_out, opt_out), met

        (params, opt_state), mets = jax.lax.scan(
            mini_step, (state.params, state.opt_state), split
        )  # scans the mini axis of [m, u, b, T]
        all_finite = jnp.all(mets["finite"] > 0)
        revert = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(all_finite, a, b), new, old
        )
        new_state = RLState(params=revert(params, state.params), opt_state=revert(opt_state, state.opt_state))
        gaps = {k: jnp.sum(mets.pop(k)) for k in [k for k in mets if k.endswith((_GAP_SUM, GAP_COUNT))]}
        metrics = _merge_metrics({k: v for k, v in mets.items() if k != "finite"})
        for r in roles:  # mean |behaviour − old| over all drawn loss tokens of the batch
            if f"{r}/{_GAP_SUM}" in gaps:
                count = gaps[f"{r}/{GAP_COUNT}"]
                metrics[f"{r}/{GAP}"] = gaps[f"{r}/{_GAP_SUM}"] / jnp.maximum(count, 1.0)
                metrics[f"{r}/{GAP_COUNT}"] = count
        metrics["finite"] = all_finite
        return new_state, metrics

    jitted = jax.jit(core, static_argnames=("trained",), donate_argnums=(0,) if donate_state else ())

    def update(
        state: RLState,
        batches: Mapping[str, TrainBatch | Mapping[str, Any]],
        trained: Sequence[str],
        constants: Mapping[str, Any] | None = None,
    ):
        trained = check_trained(state.params, trained)
        constants = dict(constants or {})
        clash = sorted(set(constants) & set(state.params))
        if clash:
            raise ValueError(f"update: constants {clash} clash with agent names in state.params")
        if not batches:
            raise ValueError("update: batches is empty; pass {role: batch}")
        sel = {role: check_update_batch(b, role, loss_cfg, update_cfg) for role, b in batches.items()}
        return jitted(state, sel, trained, constants)

    update.jitted = jitted
    return update


def check_update_batch(
    batch: TrainBatch | Mapping[str, Any], role: str, loss_cfg: losses.LossConfig, update_cfg: UpdateConfig
) -> TrainBatch:
    """The batch an update of ``role`` reads, checked on the host (every path runs this): the RL
    fields present and ``[B, T]``, ``ref_logprobs`` kept only for a KL term, loss tokens' turn ids in
    ``[0, max_turns)``, and N divisible by the mini × micro split. ``old_logprobs`` may be absent
    when ``update_cfg.old_from_update``."""
    b = as_train_batch(batch).checked(
        role, rl_fields=True, ref=loss_cfg.kl_coef > 0, old=not update_cfg.old_from_update
    )
    _check_turn_ids(b, role, loss_cfg.max_turns)
    m, u = update_cfg.num_mini_batches, update_cfg.num_micro_batches
    n = b.shape[0]
    if n % (m * u):
        raise ValueError(
            f"batch[{role!r}] has {n} rows, not divisible by num_mini_batches * num_micro_batches = {m} * {u}"
        )
    return b


def compute_logprobs_fn(
    logits_fn: LogitsFn | None,
    temperature: float = 1.0,
    *,
    num_micro_batches: int = 1,
    chunk_size: int | None = None,
    logprobs_fn: LogprobsFn | None = None,
):
    """Jitted `fn(params, role, batch) -> logp_bt [B, T] float32` (0 outside loss_mask).

    Used after the rollout to recompute old log-probs under the training graph (and reference
    log-probs with a reference `logits_fn`); the same log-softmax as the loss. `role` is static.
    """
    if not (isinstance(num_micro_batches, int) and num_micro_batches >= 1):
        raise ValueError(f"num_micro_batches must be an int >= 1, got {num_micro_batches!r}")

    lp_fn = _as_logprobs_fn(logits_fn, logprobs_fn, temperature, chunk_size)

    def core(params, role, batch):
        batch = as_train_batch(batch).model_inputs()

        def one(mb):
            logp, _ = lp_fn(params, role, mb)
            return logp * (mb.loss_mask > 0)

        split = jax.tree_util.tree_map(lambda x: x.reshape((num_micro_batches, -1) + x.shape[1:]), batch)
        out = jax.lax.map(one, split)
        return out.reshape((-1,) + out.shape[2:])

    jitted = jax.jit(core, static_argnums=(1,))

    def fn(params, role: str, batch: TrainBatch | Mapping[str, Any]):
        sel = logprob_inputs(batch, role)
        n = sel.shape[0]
        if n % num_micro_batches:
            raise ValueError(f"compute_logprobs: {n} rows not divisible by {num_micro_batches}")
        return jitted(params, role, sel)

    fn.jitted = jitted
    return fn


def logprob_inputs(batch: TrainBatch | Mapping[str, Any], role: str) -> TrainBatch:
    """The model fields of ``batch`` a log-prob pass reads (``turn_ids`` defaults to 0 on loss tokens)."""
    try:
        b = as_train_batch(batch)
    except ValueError as e:
        raise ValueError(f"compute_logprobs: batch for role {role!r}: {e}") from None
    if b.turn_ids is None:
        b = b.replace(turn_ids=np.where(np.asarray(b.loss_mask) > 0, 0, -1).astype(np.int32))
    return b.model_inputs().checked(role, rl_fields=False, ref=False)
