"""The two-level bootstrap (seeds × questions) of rema_jax.eval.stats against known answers."""

import math

import numpy as np
import pytest

from rema_jax.eval import stats


def test_constant_matrix_has_a_zero_width_interval():
    for value in (0.0, 1.0, 0.3):
        ci = stats.bootstrap_mean_ci(np.full((3, 96), value), n_boot=500)
        assert ci.estimate == ci.low == ci.high == value
        assert (ci.seeds, ci.questions, ci.level) == (3, 96, 0.95)
    d = stats.paired_difference_ci(np.full((3, 96), 0.75), np.full((3, 96), 0.25), n_boot=500)
    assert d.estimate == d.low == d.high == 0.5 and d.excludes_zero


def test_one_seed_matches_the_binomial_normal_approximation():
    p, q = 0.3, 400
    x = np.zeros(q)
    x[: int(p * q)] = 1.0
    reps = stats.bootstrap_replicates(x, n_boot=20_000, seed=1)
    se = math.sqrt(p * (1 - p) / q)  # the plug-in bootstrap's standard error, exactly
    assert reps.std() == pytest.approx(se, rel=0.03)
    ci = stats.bootstrap_mean_ci(x, n_boot=20_000, seed=1)
    assert ci.estimate == pytest.approx(p)
    assert ci.low == pytest.approx(p - 1.96 * se, abs=0.006)
    assert ci.high == pytest.approx(p + 1.96 * se, abs=0.006)


def test_seed_variation_is_resampled():
    """All variation between two seeds (rows 0s and 1s): replicate means are 0, 1/2 or 1 with
    probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1] and the variance is 1/8."""
    x = np.stack([np.zeros(50), np.ones(50)])
    reps = stats.bootstrap_replicates(x, n_boot=20_000, seed=0)
    assert set(np.unique(reps)) <= {0.0, 0.5, 1.0}
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.02)
    assert reps.var() == pytest.approx(1 / 8, rel=0.05)
    ci = stats.bootstrap_mean_ci(x, n_boot=20_000)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)


def test_one_question_resample_is_shared_by_all_seeds():
    """Seeds that agree question by question: the shared resample keeps every replicate's seeds
    equal, so the interval is that of one seed (independent resamples per seed would narrow it)."""
    rng = np.random.default_rng(0)
    row = (rng.random(96) < 0.5).astype(float)
    one = stats.bootstrap_mean_ci(row, n_boot=5000, seed=3)
    three = stats.bootstrap_mean_ci(np.stack([row] * 3), n_boot=5000, seed=3)
    assert three.estimate == one.estimate
    assert (three.low, three.high) == pytest.approx((one.low, one.high))  # not narrower by sqrt(3)


def test_a_large_true_difference_excludes_zero():
    rng = np.random.default_rng(1)
    b = (rng.random((3, 96)) < 0.2).astype(float)
    a = np.ones((3, 96))
    d = stats.paired_difference_ci(a, b, n_boot=2000)
    assert d.estimate == pytest.approx(1 - b.mean())
    assert d.low > 0.6 and d.excludes_zero
    assert "excludes 0: significantly higher" in stats.reading(d.scaled(100), "ReMA − VRP_RL")


def test_pairing_by_question_cancels_question_difficulty():
    """a = b with 5 of 96 questions per seed flipped 0 → 1: the paired interval excludes 0, while
    two unpaired intervals overlap."""
    rng = np.random.default_rng(2)
    b = (rng.random((3, 96)) < 0.5).astype(float)
    a = b.copy()
    for s in range(3):
        zeros = np.flatnonzero(b[s] == 0)[:5]
        a[s, zeros] = 1.0
    d = stats.paired_difference_ci(a, b, n_boot=5000)
    assert d.estimate == pytest.approx(5 / 96)
    assert d.excludes_zero and d.low > 0
    ca, cb = stats.bootstrap_mean_ci(a, n_boot=5000), stats.bootstrap_mean_ci(b, n_boot=5000)
    assert ca.low < cb.high  # unpaired intervals overlap


def test_no_difference_includes_zero_and_reads_so():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 96)) < 0.5).astype(float)
    b = a[:, ::-1].copy()  # the same accuracy per seed, shuffled per question
    d = stats.paired_difference_ci(a, b, n_boot=2000).scaled(100)
    assert d.low < 0 < d.high and not d.excludes_zero
    text = stats.reading(d, "ReMA − VRP_RL")
    assert "includes 0: no significant difference at this scale (3 seed(s) × 96 questions)" in text


def test_one_row_broadcasts_over_seeds():
    start = np.array([1.0, 0.0, 0.0, 1.0])
    end = np.array([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    d = stats.paired_difference_ci(end, start, n_boot=200)
    assert d.estimate == pytest.approx((1 / 4 + 2 / 4) / 2) and d.seeds == 2


def test_deterministic_in_the_seed_and_validates_shapes():
    x = (np.random.default_rng(4).random((3, 40)) < 0.4).astype(float)
    assert stats.bootstrap_mean_ci(x, seed=7) == stats.bootstrap_mean_ci(x, seed=7)
    assert stats.bootstrap_mean_ci(x, seed=7, n_boot=300) != stats.bootstrap_mean_ci(x, seed=8, n_boot=300)
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_difference_ci(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="pair seed by seed"):
        stats.paired_difference_ci(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_mean_ci(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap_mean_ci([0.0, np.nan])
    ci = stats.bootstrap_mean_ci(x, n_boot=300).scaled(100)
    assert ci.format() == f"{ci.estimate:.1f} [{ci.low:.1f}, {ci.high:.1f}]"
    assert set(ci.as_dict()) == {"estimate", "low", "high", "level", "n_boot", "seeds", "questions"}
