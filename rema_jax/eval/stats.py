"""Confidence intervals for held-out accuracy over RL seeds and questions (pure NumPy).

A run's held-out evaluation is a 0/1 vector over questions; a method run with several RL seeds is
a matrix ``correct[seed, question]`` (every seed on the same questions, in the same order). Two
sources of variation matter: which questions were drawn (the held-out set is a sample of the
task distribution) and which RL seed was drawn (training is noisy). The two-level bootstrap
resamples both:

  1. seeds with replacement (``S`` draws of ``S`` rows);
  2. questions with replacement (``Q`` draws of ``Q`` columns), the *same* question resample for
     every seed (the questions are shared, so they are one random effect, not ``S`` of them);

and takes the mean of the resampled matrix. The interval is the percentile interval of those
replicate means. With one seed it is the ordinary bootstrap over questions.

A resample is drawn as multinomial counts (how often each seed / question was drawn), so a
replicate mean is ``w_seed @ correct @ w_question / (S Q)``: no ``[B, S, Q]`` gather.

``paired_difference_ci(a, b)`` bootstraps ``a - b`` the same way: seed ``i`` of ``a`` is paired with
seed ``i`` of ``b`` (same ``loop.seed``: same training question order) and question ``j`` with
question ``j``, so question difficulty cancels and the interval is the one of the paired effect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DEFAULT_N_BOOT = 10_000


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (same units as the input)."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    seeds: int
    questions: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def scaled(self, factor: float) -> "Interval":
        """The interval in other units (e.g. ×100 for percent)."""
        return dataclasses.replace(
            self, estimate=self.estimate * factor, low=self.low * factor, high=self.high * factor
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self, digits: int = 1, signed: bool = False) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"


def _as_matrix(x: Any, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty [seeds, questions] matrix, got shape {np.shape(x)}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: non-finite values")
    return m


def bootstrap_replicates(x: Any, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` two-level bootstrap means of ``x[seed, question]`` (seeds and questions resampled
    with replacement, one question resample shared by all seeds); deterministic in ``seed``."""
    m = _as_matrix(x, "x")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_s, n_q = m.shape
    rng = np.random.default_rng(seed)
    # questions first: for a given seed, inputs with the same number of questions get the same
    # question resamples (identical seeds stacked give exactly the one-seed interval)
    w_q = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot).astype(np.float64)  # [B, Q]
    w_s = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=n_boot).astype(np.float64)  # [B, S]
    return np.einsum("bs,sq,bq->b", w_s, m, w_q) / (n_s * n_q)


def _interval(m: np.ndarray, n_boot: int, seed: int, level: float) -> Interval:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = bootstrap_replicates(m, n_boot=n_boot, seed=seed)
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2, 1.0 - alpha / 2])
    est = float(m.mean())
    if np.all(m == m.flat[0]):  # constant input: every replicate is the mean (no float rounding)
        low = high = est = float(m.flat[0])
    return Interval(
        estimate=est,
        low=float(low),
        high=float(high),
        level=level,
        n_boot=n_boot,
        seeds=m.shape[0],
        questions=m.shape[1],
    )


def bootstrap_mean_ci(correct: Any, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of ``correct[seed, question]`` (a 1-D vector is one seed) with its two-level percentile
    bootstrap interval."""
    return _interval(_as_matrix(correct, "correct"), n_boot, seed, level)


def paired_difference_ci(
    a: Any, b: Any, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of ``a - b`` paired by seed index and question, with its two-level bootstrap interval.

    ``a`` and ``b`` are ``[seeds, questions]`` on the same questions in the same order. ``b`` may have
    one row (e.g. the single greedy evaluation every seed starts from), broadcast over ``a``'s seeds.
    """
    ma, mb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"a and b must cover the same questions: {ma.shape[1]} vs {mb.shape[1]} columns")
    if ma.shape[0] != mb.shape[0] and 1 not in (ma.shape[0], mb.shape[0]):
        raise ValueError(f"a and b must pair seed by seed: {ma.shape[0]} vs {mb.shape[0]} rows")
    ma, mb = np.broadcast_arrays(ma, mb)
    return _interval(ma - mb, n_boot, seed, level)


def reading(diff: Interval, name: str, *, unit: str = " points", digits: int = 1) -> str:
    """One sentence saying what a difference interval shows, from its numbers."""
    lo, hi = f"{diff.low:+.{digits}f}", f"{diff.high:+.{digits}f}"
    pct = int(round(100 * diff.level))
    if not diff.excludes_zero:
        return (
            f"the {pct}% CI of {name} [{lo}, {hi}]{unit} includes 0: no significant difference "
            f"at this scale ({diff.seeds} seed(s) × {diff.questions} questions)"
        )
    direction = "higher" if diff.low > 0 else "lower"
    return (
        f"the {pct}% CI of {name} [{lo}, {hi}]{unit} excludes 0: significantly {direction} "
        f"at this scale ({diff.seeds} seed(s) × {diff.questions} questions)"
    )
