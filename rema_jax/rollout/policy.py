"""Binds a `rema_jax.sampling.Sampler` to the rollout's `Policy` protocol."""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from rema_jax.rollout.types import Policy


def make_sampler_policy(sampler, params, adapters_by_role: Mapping[str, Any], *, seed: int = 0) -> Policy:
    """A policy that samples with ``sampler`` using the role's adapter tree.

    Args:
      sampler: a ``rema_jax.sampling.Sampler``.
      params: the base parameter tree (Contract 1).
      adapters_by_role: ``{"meta_thinking": adapter, "reasoning": adapter}`` (or ``"single"``); an
        adapter may be None (shared parameters). Same-structure trees never recompile the sampler.
      seed: base seed. Call ``k`` of the returned policy samples with seed ``seed * 1_000_003 + k``,
        so a rollout is deterministic for a given seed and every call draws fresh randomness. The
        call counter lives in the policy: make a new policy (or pass a new seed) per training step.
    """
    counter = itertools.count()
    adapters = dict(adapters_by_role)

    def policy(role, prompts, sampling):
        if role not in adapters:
            raise KeyError(f"no adapter for role {role!r}; adapters_by_role has {sorted(adapters)}")
        return sampler.generate(params, adapters[role], prompts, sampling, seed=seed * 1_000_003 + next(counter))

    return policy
