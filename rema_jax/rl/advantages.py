"""Advantage estimators: GRPO, Dr.GRPO, REINFORCE++ (pure jnp, registered by name).

All estimators map Contract-4 arrays to token-level advantages `adv_bt [B, T] float32`, zero
outside `loss_mask`. They run once per rollout batch (outside the update's jit), so group ids
are arbitrary ints; rows with different `role_ids` never share a GRPO group, which is how a
merged shared-weights batch gets groups per (role, question) like the official code.

Common keyword inputs (estimators ignore what they do not need):
  rewards_b [B]          scalar reward per sequence (sum of its turn rewards)
  group_ids_b [B]        question index
  loss_mask_bt [B, T]    1 on this role's generated tokens
  turn_ids_bt [B, T]     turn index of each loss token, -1 elsewhere
  role_ids_b [B]         optional role index (default all 0)
  old_logprobs_bt, ref_logprobs_bt [B, T]   REINFORCE++ KL-in-reward (optional)
  turn_rewards_bk [B, K] optional per-turn rewards for REINFORCE++ (K = max turns)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

AdvantageFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage_estimator(name: str):
    """Decorator: register `fn` under `name` for `AdvantageConfig.estimator`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_advantage_estimator(name: str) -> AdvantageFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def advantage_estimators() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """estimator: a registered name ("grpo", "dr_grpo", "reinforce_pp").
    eps: GRPO std epsilon (1e-6 as verl). kl_coef: REINFORCE++ in-reward k1 KL coefficient beta
    (paper single-turn 1e-2). whiten_eps: REINFORCE++ whitening epsilon (1e-8 as verl).
    whiten_scope: which rows one REINFORCE++ whitening spans when several roles train in one step.
    "batch" (default): all of them together, as the official shared-weights trainer whitens its
    merged two-role batch (``merge_roles_data``); "role": each role's rows on their own."""

    estimator: str = "grpo"
    eps: float = 1e-6
    kl_coef: float = 0.0
    whiten_eps: float = 1e-8
    whiten_scope: Literal["batch", "role"] = "batch"

    def __post_init__(self):
        get_advantage_estimator(self.estimator)  # raises with the registered names
        if self.eps < 0 or self.whiten_eps < 0:
            raise ValueError(f"AdvantageConfig eps/whiten_eps must be >= 0, got {self.eps}, {self.whiten_eps}")
        if self.kl_coef < 0:
            raise ValueError(f"AdvantageConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.whiten_scope not in ("batch", "role"):
            raise ValueError(f"AdvantageConfig.whiten_scope must be 'batch' or 'role', got {self.whiten_scope!r}")

    @property
    def reads_old_logprobs(self) -> bool:
        """Whether the estimator reads π_old (REINFORCE++'s in-reward KL, ``kl_coef > 0``): the
        trainer then computes old log-probs before the advantages, in a pass of their own."""
        return self.kl_coef > 0


def _group_index(group_ids_b, role_ids_b) -> tuple[jax.Array, int]:
    """Dense group index per row for keys (role, question), and the number of rows N."""
    g = np.asarray(group_ids_b).astype(np.int64)
    r = np.zeros_like(g) if role_ids_b is None else np.asarray(role_ids_b).astype(np.int64)
    if g.ndim != 1 or r.shape != g.shape:
        raise ValueError(f"group_ids must be [B] and role_ids [B]; got {g.shape}, {r.shape}")
    _, inv = np.unique(np.stack([r, g], 1), axis=0, return_inverse=True)
    return jnp.asarray(inv.reshape(-1), jnp.int32), g.shape[0]


def _group_stats(rewards_b, idx_b, n):
    """Per-row group mean and unbiased std (size-1 groups: mean 0, std 1, as verl)."""
    r = jnp.asarray(rewards_b, jnp.float32)
    cnt = jax.ops.segment_sum(jnp.ones_like(r), idx_b, num_segments=n)
    s = jax.ops.segment_sum(r, idx_b, num_segments=n)
    mean_g = s / jnp.maximum(cnt, 1.0)
    sq = jax.ops.segment_sum((r - mean_g[idx_b]) ** 2, idx_b, num_segments=n)
    std_g = jnp.sqrt(sq / jnp.maximum(cnt - 1.0, 1.0))
    single = cnt[idx_b] <= 1
    mean = jnp.where(single, 0.0, mean_g[idx_b])
    std = jnp.where(single, 1.0, std_g[idx_b])
    return mean, std


def _broadcast(adv_b, loss_mask_bt):
    m = jnp.asarray(loss_mask_bt, jnp.float32)
    return adv_b[:, None] * m


@register_advantage_estimator("grpo")
def grpo_advantages(*, rewards_b, group_ids_b, loss_mask_bt, role_ids_b=None, cfg=None, **_):
    """GRPO: A_i = (R_i - mean_G(R)) / (std_G(R) + eps), std unbiased (torch.std), groups G =
    (role, question); a group of one gets mean 0 and std 1 (verl). Broadcast to every loss token."""
    eps = (cfg or AdvantageConfig()).eps
    idx, n = _group_index(group_ids_b, role_ids_b)
    mean, std = _group_stats(rewards_b, idx, n)
    adv = (jnp.asarray(rewards_b, jnp.float32) - mean) / (std + eps)
    return _broadcast(adv, loss_mask_bt)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(*, rewards_b, group_ids_b, loss_mask_bt, role_ids_b=None, **_):
    """Dr.GRPO: A_i = R_i - mean_G(R) (no std normalisation; size-1 groups: A_i = R_i)."""
    idx, n = _group_index(group_ids_b, role_ids_b)
    mean, _ = _group_stats(rewards_b, idx, n)
    return _broadcast(jnp.asarray(rewards_b, jnp.float32) - mean, loss_mask_bt)


def masked_whiten(x_bt, mask_bt, eps: float = 1e-8):
    """verl `masked_whiten`: (x - mean) * rsqrt(var_unbiased + eps) over masked entries."""
    m = jnp.asarray(mask_bt, jnp.float32)
    cnt = jnp.maximum(m.sum(), 1.0)
    mean = (x_bt * m).sum() / cnt
    var = (((x_bt - mean) ** 2) * m).sum() / cnt
    var = var * cnt / jnp.maximum(cnt - 1.0, 1.0)  # Bessel correction
    return (x_bt - mean) * jax.lax.rsqrt(var + eps) * m


def _last_token_of_turns(mask_bt, turn_ids_bt):
    """[B, T] bool marking each turn's last loss token, and the turn index (-1 off the mask)."""
    m = jnp.asarray(mask_bt) > 0
    t = jnp.where(m, jnp.asarray(turn_ids_bt), -1)
    nxt = jnp.concatenate([t[:, 1:], jnp.full_like(t[:, :1], -1)], axis=1)
    is_last = m & (nxt != t)
    return is_last, t


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(
    *,
    rewards_b,
    loss_mask_bt,
    turn_ids_bt=None,
    old_logprobs_bt=None,
    ref_logprobs_bt=None,
    turn_rewards_bk=None,
    cfg=None,
    **_,
):
    """REINFORCE++ (OpenRLHF / verl `compute_reinforce_plus_plus_outcome_advantage`).

    r_t = -beta * (logp_old_t - logp_ref_t) on loss tokens (k1 KL in the reward; skipped when
          beta == 0 or no ref log-probs), plus the outcome reward on the last loss token of the
          sequence; with `turn_rewards_bk`, each turn's last loss token gets its turn-level
          return-to-go sum_{k' >= k} R_k' (gamma_turn = 1, ReMA code).
    G_t = sum_{s >= t} r_s within each contiguous run of loss tokens (gamma = 1; the running return
          resets at non-loss positions, so turns do not leak into each other).
    A   = masked_whiten(G) over the whole batch (unbiased var, no group baseline).
    """
    cfg = cfg or AdvantageConfig(estimator="reinforce_pp")
    mask = jnp.asarray(loss_mask_bt, jnp.float32)
    n, l = mask.shape
    r_tok = jnp.zeros((n, l), jnp.float32)
    if cfg.kl_coef > 0 and ref_logprobs_bt is not None:
        if old_logprobs_bt is None:
            raise ValueError("reinforce_pp with kl_coef > 0 needs old_logprobs_bt")
        kl = jnp.asarray(old_logprobs_bt, jnp.float32) - jnp.asarray(ref_logprobs_bt, jnp.float32)
        r_tok = r_tok - cfg.kl_coef * kl * mask
    if turn_rewards_bk is None:
        pos = jnp.arange(l)[None, :]
        last = jnp.max(jnp.where(mask > 0, pos, -1), axis=1)  # -1: no loss token
        onehot = (pos == last[:, None]) & (last[:, None] >= 0)
        r_tok = r_tok + onehot * jnp.asarray(rewards_b, jnp.float32)[:, None]
    else:
        if turn_ids_bt is None:
            raise ValueError("reinforce_pp with turn_rewards_bk needs turn_ids_bt")
        tr = jnp.asarray(turn_rewards_bk, jnp.float32)
        k = tr.shape[1]
        turn_return = jnp.flip(jnp.cumsum(jnp.flip(tr, 1), 1), 1)  # [B, K]
        is_last, t = _last_token_of_turns(mask, turn_ids_bt)
        val = jnp.take_along_axis(turn_return, jnp.clip(t, 0, k - 1), axis=1)
        r_tok = r_tok + jnp.where(is_last, val, 0.0)

    def step(running, xs):
        r_t, m_t = xs
        running = r_t + running
        return running * m_t, running

    _, returns = jax.lax.scan(step, jnp.zeros((n,), jnp.float32), (jnp.flip(r_tok, 1).T, jnp.flip(mask, 1).T))
    returns = jnp.flip(returns.T, 1) * mask
    return masked_whiten(returns, mask, cfg.whiten_eps)


def compute_advantages(cfg: AdvantageConfig, **inputs) -> jax.Array:
    """Dispatch to the configured estimator; returns adv_bt [B, T] float32."""
    return get_advantage_estimator(cfg.estimator)(cfg=cfg, **inputs)


def frac_reward_zero_std(rewards_b, group_ids_b, role_ids_b=None) -> float:
    """Share of (role, question) groups whose rewards are all equal (no GRPO signal).

    Groups of a single sequence count as zero-std.
    """
    r = np.asarray(rewards_b, np.float64)
    g = np.asarray(group_ids_b)
    ro = np.zeros_like(g) if role_ids_b is None else np.asarray(role_ids_b)
    keys = {}
    for key, val in zip(zip(ro.tolist(), g.tolist()), r.tolist()):
        keys.setdefault(key, []).append(val)
    if not keys:
        return 0.0
    return float(np.mean([float(np.ptp(v) == 0.0) for v in keys.values()]))


def group_reward_metrics(rewards_b, group_ids_b, role_ids_b=None) -> dict[str, float]:
    """reward mean/std and frac_reward_zero_std for logging."""
    r = np.asarray(rewards_b, np.float64)
    return {
        "reward_mean": float(r.mean()) if r.size else 0.0,
        "reward_std": float(r.std()) if r.size else 0.0,
        "frac_reward_zero_std": frac_reward_zero_std(rewards_b, group_ids_b, role_ids_b),
    }
