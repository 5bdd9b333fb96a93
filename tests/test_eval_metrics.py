"""pass@k, maj@k, judge accuracy and the Table-1 markdown layout."""

import itertools
import math

import pytest

from rema_jax.eval import metrics
from rema_jax.eval.table import markdown_table


def _pass_at_k_bruteforce(n, c, k):
    """Probability that a random k-subset of n samples (c correct) holds a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (8, 1, 8), (4, 4, 2)])
def test_pass_at_k_matches_bruteforce(n, c, k):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_bruteforce(n, c, k))


def test_pass_at_k_closed_form_and_errors():
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(200, 10, 50) == pytest.approx(1 - math.comb(190, 50) / math.comb(200, 50))
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)
    assert metrics.mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)


def test_majority_ties_and_normalisation():
    assert metrics.majority_index(["1", "2", "2", "1"]) == 0  # tie: first seen wins
    assert metrics.majority_index(["2", "1", "1", "2"]) == 0
    assert metrics.majority_index([None, "3", "\\dfrac{1}{2}", "\\frac{1}{2}"]) == 2
    assert metrics.majority_index([None, None]) is None


def test_maj_at_k():
    answers = ["5", "7", "7", "5", "5"]
    correct = [True, False, False, True, True]
    assert metrics.maj_at_k(answers, correct, 1) is True
    assert metrics.maj_at_k(answers, correct, 3) is False  # 7 wins among the first 3
    assert metrics.maj_at_k(answers, correct, 5) is True
    assert metrics.maj_at_k([None], [False], 1) is False
    with pytest.raises(ValueError):
        metrics.maj_at_k(answers, correct, 6)


def test_judge_accuracy_both_orders():
    labels = ["A>B", "B>A", "A>B", "B"]
    verdicts = ["A", "B", "B", "B"]
    assert metrics.judge_accuracy(verdicts, labels) == pytest.approx(0.75)
    # Swapped: pair 0 flips correctly (B), pair 1 answers B again (position bias), pair 3 flips.
    swapped = ["B", "B", "A", "A"]
    assert metrics.judge_accuracy(verdicts, labels, swapped) == pytest.approx(0.5)
    assert metrics.judge_accuracy([None], ["A>B"]) == 0.0
    with pytest.raises(ValueError, match="labels"):
        metrics.judge_accuracy(["A"], ["tie"])


def test_table_layout_like_paper():
    scores = {"VRP(CoT)": {"MATH500": 30.8, "GSM8K": 67.48}, "ReMA": {"MATH500": 33.8, "GSM8K": 67.48}}
    text = markdown_table(scores)
    lines = text.strip().split("\n")
    assert lines[0] == "| Benchmark | VRP(CoT) | ReMA |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| MATH500 | 30.80 | 33.80 (+3.00) |"
    assert lines[3] == "| GSM8K | 67.48 | 67.48 (+0.00) |"
    assert lines[4] == "| **Average** | 49.14 | 50.64 (+1.50) |"


def test_table_negative_delta_missing_cells_and_order():
    scores = {"a": {"X": 75.0, "Y": 10.0}, "b": {"X": 74.4}}
    text = markdown_table(scores, columns=["a", "b"], benchmarks=["Y", "X"])
    assert "| Y | 10.00 | – |" in text
    assert "| X | 75.00 | 74.40 (-0.60) |" in text
    assert "| **Average** | 42.50 | 74.40 (+31.90)* |" in text
    with pytest.raises(ValueError, match="no scores for column"):
        markdown_table(scores, columns=["c"])
