"""Evaluation metrics: pass@1, unbiased pass@k, maj@k, judge accuracy (optionally both orders)."""

from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, eq. 1).

    ``1 - C(n-c, k) / C(n, k)``, computed as a stable product.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_per_task: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over tasks; each entry holds one task's per-sample correctness."""
    if not correct_per_task:
        raise ValueError("mean_pass_at_k: no tasks")
    return float(np.mean([pass_at_k(len(cs), int(sum(cs)), k) for cs in correct_per_task]))


def normalize_answer(answer: str | None) -> str | None:
    """Voting key: whitespace removed, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\left``/``\\right`` dropped."""
    if answer is None:
        return None
    key = re.sub(r"\s+", "", answer)
    key = key.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    key = key.replace("\\left", "").replace("\\right", "").rstrip(".")
    return key or None


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of a sample carrying the most frequent (normalised) answer; None answers never vote.

    Ties go to the answer whose first occurrence comes first, so the result is deterministic.
    Returns None when no sample has an answer.
    """
    keys = [normalize_answer(a) for a in answers]
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, k in enumerate(keys):
        if k is not None and counts[k] == best:
            return i
    raise AssertionError("unreachable")


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the majority answer of the first `k` samples is correct (False when none answered)."""
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= {len(answers)}, got {k}")
    i = majority_index(answers[:k])
    return bool(correct[i]) if i is not None else False


def judge_accuracy(
    verdicts: Sequence[str | None], labels: Sequence[str], swapped_verdicts: Sequence[str | None] | None = None
) -> float:
    """Fraction of pairs judged right.

    Args:
      verdicts: ``"A"``, ``"B"`` or None (no parseable verdict = wrong) per pair.
      labels: the better response per pair, ``"A"``/``"B"`` (or ``"A>B"``/``"B>A"``).
      swapped_verdicts: verdicts on the same pairs with A and B exchanged. When given, a pair
        counts only if both orders pick the same underlying response (position-bias-robust).
    """
    if len(verdicts) != len(labels):
        raise ValueError(f"judge_accuracy: {len(verdicts)} verdicts but {len(labels)} labels")
    if not labels:
        raise ValueError("judge_accuracy: no pairs")
    gold = [lab[0] for lab in labels]
    for g in gold:
        if g not in ("A", "B"):
            raise ValueError(f"judge_accuracy: labels must be A/B or A>B/B>A, got {g!r}")
    right = [v == g for v, g in zip(verdicts, gold)]
    if swapped_verdicts is not None:
        if len(swapped_verdicts) != len(labels):
            raise ValueError(f"judge_accuracy: {len(swapped_verdicts)} swapped verdicts for {len(labels)} pairs")
        flip = {"A": "B", "B": "A"}
        right = [r and s == flip[g] for r, s, g in zip(right, swapped_verdicts, gold)]
    return float(np.mean(right))
