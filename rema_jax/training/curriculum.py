"""Algorithm 1's curriculum filter: at each phase start, keep the training questions whose success
rate under the current agents lies in ``[low, high]``."""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Sequence

import numpy as np

from rema_jax.tasks.types import Task
from rema_jax.training.base_model import stable_seed
from rema_jax.training.data_iterator import TaskIterator
from rema_jax.training.schedules import Phase

log = logging.getLogger(__name__)


def in_success_band(successes: int, n: int, low: float, high: float) -> bool:
    """Whether ``successes`` of ``n`` samples lie in Algorithm 1's band: ``low*n <= k <= high*n``,
    exactly. The edges are read as the decimals they are written as (``Fraction(str(0.2)) = 1/5``),
    so 1 of 5 is in [0.2, 0.8] whatever the float width or NumPy's promotion rules."""
    k = Fraction(successes)
    return Fraction(str(low)) * n <= k <= Fraction(str(high)) * n


def curriculum_pool(
    worker, view, train_tasks: Sequence[Task], roles: Sequence[str], phase: Phase, config
) -> list[Task]:
    """The questions of ``phase``'s pool: ``curriculum.pool_size`` candidates (seeded by the phase), each
    rolled out ``curriculum.num_samples`` times by ``worker`` with the agents in ``view``; roles frozen in
    this phase answer greedily, trained roles sample at temperature 1."""
    cur = config.curriculum
    candidates = TaskIterator(
        train_tasks, cur.pool_size, seed=stable_seed(config.loop.seed, "curriculum", phase.index)
    ).next()
    frozen = [r for r in roles if r not in phase.trained]
    overrides = {}
    if frozen:
        overrides = {
            **{r: {"greedy": True} for r in frozen},
            **{r: {"greedy": False, "temperature": 1.0} for r in phase.trained},
        }
    exp = worker.collect(
        view,
        candidates,
        stable_seed(config.loop.seed, "curriculum_rollout", phase.index),
        overrides,
        num_samples=cur.num_samples,
    )
    successes = np.asarray(exp.correct, bool).reshape(len(candidates), cur.num_samples).sum(1)
    kept = [t for t, k in zip(candidates, successes) if in_success_band(int(k), cur.num_samples, cur.low, cur.high)]
    log.info(
        "curriculum (phase %d, %s): kept %d of %d questions with success in [%.2f, %.2f]",
        phase.index,
        "+".join(phase.trained),
        len(kept),
        len(candidates),
        cur.low,
        cur.high,
    )
    if not kept:
        log.warning("curriculum kept no question; training on the unfiltered candidates")
        kept = candidates
    return kept
