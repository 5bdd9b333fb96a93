"""Advantage estimators against straightforward numpy references."""

import numpy as np
import pytest

from rema_jax.rl import advantages as adv


def _mask(n, l, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros((n, l), np.float32)
    for i in range(n):
        s = rng.integers(1, l // 2)
        e = rng.integers(s + 1, l + 1)
        m[i, s:e] = 1
    return m


def test_grpo_matches_reference_and_groups_per_role():
    rng = np.random.default_rng(0)
    n, l = 12, 9
    r = rng.normal(size=n).astype(np.float32)
    g = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 2])
    role = np.array([0] * 6 + [1] * 6)
    m = _mask(n, l)
    out = np.asarray(adv.grpo_advantages(rewards_b=r, group_ids_b=g, loss_mask_bt=m, role_ids_b=role))
    for i in range(n):
        same = (g == g[i]) & (role == role[i])
        if same.sum() == 1:  # size-1 group: mean 0, std 1
            expected = r[i] / (1 + 1e-6)
        else:
            expected = (r[i] - r[same].mean()) / (r[same].std(ddof=1) + 1e-6)
        np.testing.assert_allclose(out[i][m[i] > 0], expected, rtol=1e-5, atol=1e-6)
        assert np.all(out[i][m[i] == 0] == 0)


def test_grpo_identical_rewards_give_zero_and_dr_grpo():
    r = np.array([1.0, 1.0, 0.0, 1.0], np.float32)
    g = np.array([0, 0, 1, 1])
    m = np.ones((4, 3), np.float32)
    out = np.asarray(adv.grpo_advantages(rewards_b=r, group_ids_b=g, loss_mask_bt=m))
    np.testing.assert_allclose(out[:2], 0.0)
    np.testing.assert_allclose(out[2], -0.5 / (np.std([0, 1], ddof=1) + 1e-6), rtol=1e-5)
    dr = np.asarray(adv.dr_grpo_advantages(rewards_b=r, group_ids_b=g, loss_mask_bt=m))
    np.testing.assert_allclose(dr[:, 0], [0, 0, -0.5, 0.5])


def _reinforce_pp_reference(r, m, old=None, ref=None, beta=0.0, turn_rewards=None, turn_ids=None):
    n, l = m.shape
    tok = np.zeros((n, l))
    if beta > 0:
        tok -= beta * (old - ref) * m
    for i in range(n):
        idx = np.nonzero(m[i])[0]
        if turn_rewards is None:
            tok[i, idx[-1]] += r[i]
        else:
            ret = np.cumsum(turn_rewards[i][::-1])[::-1]
            for k in np.unique(turn_ids[i][m[i] > 0]):
                last = np.nonzero((turn_ids[i] == k) & (m[i] > 0))[0][-1]
                tok[i, last] += ret[k]
    returns = np.zeros((n, l))
    for i in range(n):
        run = 0.0
        for t in reversed(range(l)):
            run = tok[i, t] + run
            returns[i, t] = run
            run *= m[i, t]
    returns *= m
    vals = returns[m > 0]
    mean, var = vals.mean(), vals.var(ddof=1)
    return (returns - mean) / np.sqrt(var + 1e-8) * m


def test_reinforce_pp_outcome_with_kl():
    rng = np.random.default_rng(1)
    n, l = 6, 10
    m = _mask(n, l, 1)
    r = rng.normal(size=n)
    old, ref = rng.normal(size=(n, l)), rng.normal(size=(n, l))
    cfg = adv.AdvantageConfig(estimator="reinforce_pp", kl_coef=0.1)
    out = np.asarray(
        adv.compute_advantages(
            cfg, rewards_b=r, group_ids_b=np.zeros(n), loss_mask_bt=m, old_logprobs_bt=old, ref_logprobs_bt=ref
        )
    )
    np.testing.assert_allclose(out, _reinforce_pp_reference(r, m, old, ref, 0.1), rtol=1e-4, atol=1e-5)
    w = out[m > 0]
    assert abs(w.mean()) < 1e-5 and abs(w.std(ddof=1) - 1) < 1e-3


def test_reinforce_pp_turn_level_rewards_reset_between_turns():
    # two turns with a gap (the other role's tokens) in between
    m = np.array([[0, 1, 1, 0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 1, 1, 0, 0, 0]], np.float32)
    tid = np.array([[-1, 0, 0, -1, -1, 1, 1, 1, -1], [-1, 0, -1, -1, 1, 1, -1, -1, -1]])
    tr = np.array([[0.0, 1.0], [0.5, -1.0]])
    out = np.asarray(
        adv.reinforce_pp_advantages(rewards_b=tr.sum(1), loss_mask_bt=m, turn_ids_bt=tid, turn_rewards_bk=tr)
    )
    ref = _reinforce_pp_reference(tr.sum(1), m, turn_rewards=tr, turn_ids=tid)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_frac_zero_std_and_registry():
    r = [1, 1, 0, 1, 0, 0, 1]
    g = [0, 0, 1, 1, 2, 2, 3]
    assert adv.frac_reward_zero_std(r, g) == pytest.approx(3 / 4)  # groups 0, 2, 3 (size 1)
    assert adv.group_reward_metrics(r, g)["reward_mean"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="registered: \\['dr_grpo', 'grpo', 'reinforce_pp'\\]"):
        adv.AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="already registered"):
        adv.register_advantage_estimator("grpo")(lambda **k: None)
