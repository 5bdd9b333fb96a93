"""optax optimizer over per-agent parameter trees, with frozen agents masked out.

The trainable state is a dict of per-agent trees, e.g. {"meta_thinking": tree, "reasoning": tree}
(shared weights: {"shared": tree}); a None entry is an agent with nothing to train. Each agent
keeps its own AdamW state, created once, so its structure never changes between phases.

One step over the agents `trained` in this phase (a static tuple):
    g <- clip_by_global_norm(g_trained, max_grad_norm)     (norm over ALL trained agents' grads)
    for a in trained: u_a, s_a <- adamw(schedule).update(g_a, s_a, p_a);  p_a <- p_a + u_a
Frozen agents get no gradient and their params and AdamW state (moments AND step count) are
passed through untouched, i.e. bit-identical: a partition equivalent to
`optax.multi_transform({..., "frozen": optax.set_to_zero()})` that, unlike re-labelling a
multi_transform per phase, keeps the frozen agent's moments for when it trains again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping (defaults: verl / the official code, lr 1e-6).

    schedule: "constant" (after optional linear warmup), "cosine" or "linear" decay from
    learning_rate to learning_rate * end_lr_ratio at `decay_steps` (counted in optimizer steps
    per agent, warmup included).
    """

    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is unknown; valid: {SCHEDULES}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig.schedule={self.schedule!r} needs decay_steps > warmup_steps, got "
                f"decay_steps={self.decay_steps}, warmup_steps={self.warmup_steps}"
            )
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"OptimizerConfig betas must be in [0, 1), got ({self.b1}, {self.b2})")
        if not self.max_grad_norm > 0:
            raise ValueError(f"OptimizerConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the agent's optimizer step count."""
    lr, w = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        if w == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if w else lr, lr, w, cfg.decay_steps, end_value=lr * cfg.end_lr_ratio
        )
    decay = optax.linear_schedule(lr, lr * cfg.end_lr_ratio, cfg.decay_steps - w)
    if w == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), decay], [w])


class MultiAgentOptimizer:
    """Global-norm clip then per-agent AdamW; frozen agents untouched (see module docstring)."""

    def __init__(self, cfg: OptimizerConfig = OptimizerConfig()):
        self.cfg = cfg
        self.schedule = make_schedule(cfg)
        self.agent_tx = optax.adamw(self.schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.clip = optax.clip_by_global_norm(cfg.max_grad_norm)

    def init(self, params: Mapping[str, Any]) -> dict:
        """{agent: AdamW state, or None for a None tree}."""
        return {a: (None if p is None else self.agent_tx.init(p)) for a, p in params.items()}

    def step(
        self, grads: Mapping[str, Any], opt_state: Mapping[str, Any], params: Mapping[str, Any], trained: Sequence[str]
    ):
        """Apply `grads` (a dict over exactly the `trained` agents). Returns
        (new_params, new_opt_state, {"grad_norm", "lr"}); other agents are passed through."""
        trained = tuple(trained)
        if set(grads) != set(trained):
            raise ValueError(f"grads keys {sorted(grads)} != trained agents {sorted(trained)}")
        grad_norm = optax.global_norm(dict(grads))
        clipped, _ = self.clip.update(dict(grads), self.clip.init(dict(grads)))
        new_params, new_state = dict(params), dict(opt_state)
        for a in trained:
            updates, new_state[a] = self.agent_tx.update(clipped[a], opt_state[a], params[a])
            new_params[a] = optax.apply_updates(params[a], updates)
        lr = self.schedule(agent_step_count(opt_state[trained[0]]))
        return new_params, new_state, {"grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32)}


def agent_step_count(agent_state) -> jax.Array:
    """The number of optimizer steps this agent has taken (from its AdamW state)."""
    for s in jax.tree_util.tree_leaves(agent_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            return s.count
    raise ValueError("no ScaleByAdamState found in the agent's optimizer state")


def check_trained(params: Mapping[str, Any], trained: Sequence[str]) -> tuple[str, ...]:
    """Validate the phase's trained agents against the params dict; returns them as a tuple."""
    trained = tuple(trained)
    if not trained:
        raise ValueError("trained agents must be a non-empty tuple, e.g. ('reasoning',)")
    for a in trained:
        if a not in params:
            raise ValueError(f"trained agent {a!r} not in the trainable params {sorted(params)}")
        if params[a] is None:
            raise ValueError(f"trained agent {a!r} has no trainable params (None tree)")
    if len(set(trained)) != len(trained):
        raise ValueError(f"trained agents repeat: {trained}")
    return trained


def tree_bitwise_equal(a, b) -> bool:
    """True when two pytrees have the same structure and bit-identical leaves (host check)."""
    import numpy as np

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )
