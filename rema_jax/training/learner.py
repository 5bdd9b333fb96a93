"""The learner: the RL state and everything that reads or writes it.

It owns the agents' trainable trees and their AdamW states (``rl.RLState``), the frozen constants
(base, reference), the optimizer, the old / reference log-prob passes and one jitted update whose
input state is donated. On one device these are plain ``jax.jit`` functions; with a ``ShardingPlan``
the same cores are compiled with explicit in/out shardings (``sharding.shard_update_fn`` /
``shard_logprobs_fn``), once per (phase, shapes). Both paths run the same host-side batch checks
(``rl.check_update_batch``).

Log-probs are needed at response tokens only, so the passes project to the vocabulary there alone
(``rl.sparse_token_logprobs_and_entropy`` with ``max_loss_tokens`` gathered positions per row).

With ``update.share_prefix`` (one device only) each pass first plans, on the host, which rows of each
of its micro-batches share a prompt (``rl.plan_prefix``, attached as ``TrainBatch.prefix``), and the
model runs every shared prefix once (``models.forward_shared_prefix``; nested plans also run once
what a group of prompts shares, e.g. a question before the reasoning agent's different plans). The
first plan of a batch shape fixes its structure (flat or nested), and its buckets never shrink within
a run: the suffix (and a nested plan's inner prefix) starts at the config's answer length
(``rollout.max_new_tokens``), a nested plan's outer prefix so that both hold
``rollout.max_prompt_len``, and each bucket grows only when a batch needs more, so a pass compiles a
few times per run (once per batch shape after the first steps) instead of once per new bucket
combination. The mesh path keeps the plain passes: a plan's unique prefixes do not split over the
data axis like rows do.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax import models, rl, sharding
from rema_jax.models.adapters import trains_head
from rema_jax.rl.batch import TrainBatch, host_rows
from rema_jax.training.layout import AgentLayout


class NonFiniteUpdateError(FloatingPointError):
    """The loss or a gradient was NaN/inf; the update was not applied (see ``Learner.update``)."""


class Learner:
    """RL state + optimizer + log-prob passes + the update, for one ``AgentLayout``."""

    def __init__(
        self,
        config,
        layout: AgentLayout,
        model_config,
        trainable: Mapping[str, Any],
        constants: Mapping[str, Any],
        plan: sharding.ShardingPlan | None = None,
    ):
        self.config, self.layout, self.model_config, self.plan = config, layout, model_config, plan
        self._prefix_buckets: dict[tuple, tuple[int, ...]] = {}  # (role, chunks, B, T) -> PrefixPlan.buckets
        self.optimizer = rl.MultiAgentOptimizer(config.optimizer)
        self.state = _committed(rl.init_rl_state(trainable, self.optimizer))
        self.constants = dict(constants)
        if plan is not None:  # adapters / trained params and their AdamW moments by the rules
            self.state, self.constants = plan.put(self.state), plan.put(self.constants)
        rounds = config.rollout.max_turns if config.rollout.mode == "multi_turn" else 1
        self.max_loss_tokens = min(rounds * (config.rollout.max_new_tokens + 1), config.loop.max_seq_len)
        micro = config.update.num_micro_batches
        self.update_fn = rl.make_update_fn(
            None,
            config.loss,
            self.optimizer,
            config.update,
            donate_state=True,
            logprobs_fn=self._sparse_logprobs(layout.policy_view),
        )
        self.logprob_fn = rl.compute_logprobs_fn(
            None,
            config.loss.temperature,
            num_micro_batches=micro,
            logprobs_fn=self._sparse_logprobs(layout.policy_view),
        )
        self.ref_logprob_fn = rl.compute_logprobs_fn(
            None,
            config.loss.temperature,
            num_micro_batches=micro,
            logprobs_fn=self._sparse_logprobs(layout.reference_view),
        )
        self._mesh_steps: dict[tuple, Any] = {}

    @property
    def params(self) -> dict[str, Any]:
        """The agents' trees and the constants: what the policy / reference views read."""
        return {**self.state.params, **self.constants}

    def _sparse_logprobs(self, view):
        """``logprobs_fn(params, role, batch)``: the role's policy (``view``) at loss positions only."""
        temperature, k = self.config.loss.temperature, self.max_loss_tokens

        def logprobs_fn(params, role, batch: TrainBatch):
            base, adapter = view(params, role)
            prefix = batch.prefix

            def shared_logits_at(pos_bk):  # full-row positions -> the row's suffix positions
                at_bk = jnp.maximum(pos_bk - prefix.prefix_len[:, None], 0)
                return models.forward_shared_prefix(
                    self.model_config, base, prefix, adapter, logits_at_bk=at_bk, head_inputs=True
                )

            def logits_at(pos_bk):
                if prefix is not None:
                    return shared_logits_at(pos_bk)
                return models.forward(
                    self.model_config,
                    base,
                    batch.tokens,
                    adapter=adapter,
                    attention_mask=batch.attention_mask,
                    logits_at_bk=pos_bk,
                    head_inputs=True,
                )

            # The entropy is trained only with a bonus.
            return rl.sparse_token_logprobs_and_entropy(
                logits_at,
                batch.tokens,
                batch.loss_mask,
                k,
                temperature,
                chunk_size=self.model_config.logits_chunk,
                trained_head=trains_head(adapter),
                entropy_grad=self.config.loss.entropy_coef > 0,
            )

        return logprobs_fn

    def release_programs(self) -> None:
        """Forgets the compiled update and log-prob programs (they compile again on the next call)."""
        for fn in (self.update_fn, self.logprob_fn, self.ref_logprob_fn):
            fn.jitted.clear_cache()
        self._mesh_steps.clear()

    # ------------------------------------------------------------------ log-prob passes
    def old_logprobs(self, role: str, batch: TrainBatch) -> np.ndarray:
        """log π_θ ``[N, L]`` of ``role``'s rows under the current agents (0 outside the loss mask)."""
        return self._logprobs(self.logprob_fn, role, batch)

    def ref_logprobs(self, role: str, batch: TrainBatch) -> np.ndarray:
        """log π_ref ``[N, L]`` under the reference policy (``AgentLayout.reference_view``)."""
        return self._logprobs(self.ref_logprob_fn, role, batch)

    def with_prefix(self, batch: TrainBatch, chunks: int, role: str = "") -> TrainBatch:
        """``batch`` (``role``'s rows) with the shared-prefix plan of its ``chunks`` micro-batches
        (``prefix`` None when ``update.share_prefix`` is off, on the mesh path, or when sharing would
        not save work)."""
        if not self.config.update.share_prefix or self.plan is not None or batch.shape[0] % chunks:
            return batch.replace(prefix=None)  # (rows that do not split are refused by the pass's own check)
        key = (role, chunks, *batch.shape)
        args = (batch.tokens, batch.attention_mask, batch.loss_mask, chunks)
        known = self._prefix_buckets.get(key)
        if known is None:  # the first batch of this shape picks the structure (flat or nested)
            answer = self.suffix_floor(batch.shape[1])
            plan = rl.plan_prefix(
                *args, min_suffix=answer, min_inner=answer, min_prompt=self.config.rollout.max_prompt_len
            )
        else:  # the same structure, at least the largest buckets so far: reuses that compilation
            plan = rl.plan_prefix(*args, min_buckets=known)
        if plan is not None:
            self._prefix_buckets[key] = plan.buckets(chunks)
        else:  # the grown buckets would cost more than the plain pass; this batch's own buckets may not
            plan = rl.plan_prefix(*args)
        return batch.replace(prefix=plan)

    def prefix_bucket_record(self) -> list:
        """The plans' bucket record (which structure and buckets each role's batch shape has used), as
        JSON for a checkpoint: the buckets decide the passes' matmul shapes and so their fp32 rounding,
        so a resumed run needs them to compute what the uninterrupted run would."""
        return [[list(key), list(buckets)] for key, buckets in sorted(self._prefix_buckets.items())]

    def load_prefix_bucket_record(self, record: list) -> None:
        self._prefix_buckets = {tuple(key): tuple(int(x) for x in buckets) for key, buckets in record}

    def suffix_floor(self, seq_len: int) -> int:
        """The first suffix bucket S of a run: an answer of ``rollout.max_new_tokens`` plus the token
        before it and an end-of-turn token (capped by the rows' length: sampled answers reach the cap
        early in RL). A nested plan's inner prefixes (what prompts of one question do not share: the
        other agent's answer) start at the same bucket, and its outer bucket so that the two hold a
        prompt of ``rollout.max_prompt_len`` (one outer prefix per group is cheap; a recompiled update
        is not). A flat plan's prefix bucket starts at its smallest (a floor at ``max_prompt_len``
        would cost more than it saves when prompts are shorter)."""
        m = rl.prefix_plan.SUFFIX_MULTIPLE
        return min(-(-(self.config.rollout.max_new_tokens + 2) // m) * m, seq_len)

    def _logprobs(self, fn, role: str, batch: TrainBatch) -> np.ndarray:
        params = self.params
        if self.plan is None:
            return np.asarray(fn(params, role, self.with_prefix(batch, self.config.update.num_micro_batches, role)))
        gb = self._global(rl.update.logprob_inputs(batch, role))
        key = (id(fn), role, gb.shape)
        if key not in self._mesh_steps:
            self._mesh_steps[key] = sharding.shard_logprobs_fn(fn, self.plan, params, gb, role)
        return _host_values(self._mesh_steps[key](params, gb))

    # ------------------------------------------------------------------ the update
    def update(self, batches: Mapping[str, TrainBatch], trained_agents: tuple[str, ...]) -> dict[str, float]:
        """One RL update of ``trained_agents`` on ``batches`` ({role: TrainBatch with RL fields}).

        The frozen agents' trees and optimizer states pass through bit-identical. When the loss or a
        gradient is not finite, the state is left as it was and ``NonFiniteUpdateError`` is raised.
        Returns the update's scalar metrics ("<role>/<loss metric>", "loss", "grad_norm", "lr")."""
        if self.plan is None:
            chunks = self.config.update.num_mini_batches * self.config.update.num_micro_batches
            planned = {r: self.with_prefix(rl.as_train_batch(b), chunks, r) for r, b in batches.items()}
            new_state, metrics = self.update_fn(self.state, planned, trained_agents, constants=self.constants)
        else:
            checked = {r: rl.check_update_batch(b, r, self.config.loss, self.config.update) for r, b in batches.items()}
            placed = {r: self._global(b) for r, b in checked.items()}
            key = (trained_agents, tuple((r, b.shape) for r, b in sorted(placed.items())))
            if key not in self._mesh_steps:
                self._mesh_steps[key] = sharding.shard_update_fn(
                    self.update_fn, self.plan, self.state, placed, trained_agents, self.constants, donate_state=True
                )
            new_state, metrics = self._mesh_steps[key](self.state, placed, self.constants)
        self.state = new_state  # the input state was donated; a non-finite update returns it unchanged
        metrics = jax.device_get(metrics)
        if not bool(metrics.pop("finite")):
            raise NonFiniteUpdateError(
                f"the loss or a gradient is NaN/inf (loss={metrics.get('loss')}, "
                f"grad_norm={metrics.get('grad_norm')}); the update was not applied"
            )
        out = {k: float(np.asarray(v)) for k, v in metrics.items()}
        for k in [k for k in out if k.endswith(f"/{rl.update.GAP_COUNT}")]:  # no drawn token: no gap
            if out.pop(k) == 0:
                out.pop(k.replace(rl.update.GAP_COUNT, rl.update.GAP), None)
        return out

    # ------------------------------------------------------------------ mesh plumbing
    def _global(self, batch: TrainBatch) -> TrainBatch:
        """This host's rows → global arrays with rows over data × fsdp (the batch spec of the global shape)."""
        host = host_rows(batch)
        n_proc = jax.process_count()
        shapes = jax.tree.map(
            lambda v: np.broadcast_to(np.zeros((), v.dtype), (v.shape[0] * n_proc,) + v.shape[1:]), host
        )
        return sharding.global_batch_from_host(host, self.plan.batch_shardings(shapes))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_tree(self) -> dict[str, Any]:
        return {"params": self.state.params, "opt_state": self.state.opt_state}

    def load_checkpoint_tree(self, tree: Mapping[str, Any]) -> None:
        self.state = rl.RLState(params=tree["params"], opt_state=tree["opt_state"])


def _committed(tree: Any) -> Any:
    """``tree`` with each uncommitted array committed to the device it is on (no copy).

    A restored checkpoint's arrays are committed (orbax places them by the template's shardings), and
    the persistent compilation cache keys a program by its arguments' shardings, committed or not: a
    fresh run's state must be committed too, or a resumed run recompiles every program that reads it
    (8 of the 14 programs of ``test_kill_and_resume_is_exact``'s resumed run, 16 s of compiles)."""
    return jax.tree.map(
        lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) and not x.committed else x, tree
    )


def _host_values(x: jax.Array) -> np.ndarray:
    """This host's rows of a global batch-sharded array."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return full[sharding.host_rows(full.shape[0])]
