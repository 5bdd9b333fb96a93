"""The rollout worker: sampler + chat encoder + grader, the "rollout → reward" part of a step.

``collect(policy_view, tasks, seed, overrides) -> Experience`` samples every role with the jitted
sampler (no re-tokenization), grades the answers (math-verify in worker processes) and computes the
per-role rewards; ``evaluate`` is the greedy held-out pass@1 with per-sample JSONL.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

from rema_jax.rewards.math_grading import get_grader
from rema_jax.rollout import ChatEncoder, make_sampler_policy
from rema_jax.sampling import Sampler
from rema_jax.tasks.types import Task
from rema_jax.training import experience as experience_lib

PolicyView = tuple[Any, Mapping[str, Any]]  # (model tree, {role: adapter or None})


class RolloutWorker:
    """Turns (the agents' sampling view, tasks) into graded, rewarded experience."""

    def __init__(self, config, model_config, tokenizer):
        self.config = config
        self.encoder = ChatEncoder(tokenizer)
        # A multi-turn rollout alternates the agents call by call, so both fused copies pay off; a
        # single-turn one calls each agent once, and the copies are dropped after every rollout.
        fused = 2 if config.rollout.mode == "multi_turn" else 1
        self.sampler = Sampler(
            model_config,
            tokenizer,
            max_cache_len=config.model.max_cache_len,
            fused_cache_size=fused,
            share_prefix=config.model.sampler_share_prompts,
        )
        self.grader = get_grader(config.grading)

    def grade(self, predictions: Sequence[str], tasks: Sequence[Task]):
        return self.grader.grade_batch(list(predictions), [t.answer for t in tasks])

    def policy(self, view: PolicyView, seed: int):
        """A sampling policy of the agents in ``view``; call ``k`` samples with a seed derived from ``seed``."""
        base, adapters = view
        return make_sampler_policy(self.sampler, base, adapters, seed=seed)

    def collect(
        self,
        view: PolicyView,
        tasks: Sequence[Task],
        seed: int,
        overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
        *,
        num_samples: Optional[int] = None,
        solutions_per_plan: int = 1,
    ) -> experience_lib.Experience:
        """Roll out ``tasks`` (``num_samples`` per question, default the config's), grade and reward them.

        ``overrides``: per-role sampling changes, e.g. ``{"meta_thinking": {"greedy": True}}``."""
        rollout = self.config.rollout
        if num_samples is not None:
            rollout = dataclasses.replace(rollout, num_samples=num_samples)
        try:
            return experience_lib.collect(
                self.policy(view, seed),
                self.encoder,
                tasks,
                rollout,
                self.config.reward,
                self.grade,
                solutions_per_plan=solutions_per_plan,
                sampling_overrides=overrides,
            )
        finally:  # the agents change before the next rollout: their fused copies are never reused
            self.sampler.release_fused()

    def evaluate(self, view: PolicyView, tasks: Sequence[Task], seed: int, samples_path: Optional[str]):
        """Greedy pass@1 of the agents on ``tasks``; per-sample JSONL at ``samples_path`` (recomputed,
        never resumed: an existing file is replaced). Returns the harness summary (percentages)."""
        from rema_jax.eval.harness import EvalSettings, evaluate_benchmark
        from rema_jax.eval.solvers import rollout_solver

        rollout = dataclasses.replace(self.config.rollout, num_samples=1, greedy=True)
        # The solver takes math settings first and judge settings apart (a judge run's are the latter).
        math_rollout, judge_rollout = (
            (dataclasses.replace(rollout, task="math"), rollout) if rollout.task == "judge" else (rollout, None)
        )
        solver = rollout_solver(self.policy(view, seed), self.encoder, math_rollout, judge_rollout)
        settings = EvalSettings(
            batch_size=self.config.loop.eval_batch_size or max(len(tasks), 1),
            grade_timeout=self.config.grading.timeout_s,
            progress=False,
        )
        if samples_path is not None and os.path.exists(samples_path):
            os.remove(samples_path)
        try:
            return evaluate_benchmark(
                list(tasks),
                solver,
                benchmark="heldout",
                mode=self.config.rollout.mode,
                settings=settings,
                samples_path=samples_path,
            )
        finally:
            self.sampler.release_fused()
