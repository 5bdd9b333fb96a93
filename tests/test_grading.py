"""math-verify grading: extraction, the official check on tricky cases, timeouts in workers."""
import time

import pytest

from rema_jax.rewards import math_grading as mg

# (prediction, gold, expected correct) graded in-process with the official metric.
TRICKY = [
    ("so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),          # \dfrac vs \frac
    ("\\boxed{0.5}", "\\frac12", True),                            # decimal vs fraction
    ("The side is \\boxed{5 cm}", "5", True),                       # units dropped
    ("\\boxed{1,000}", "1000", True),                               # thousands comma
    ("\\boxed{50\\%}", "50", True),                                 # percentage
    ("\\boxed{-3}", "-3", True),                                    # negative
    ("\\boxed{-3}", "3", False),                                    # sign matters
    ("\\boxed{(0,1]}", "(0,1]", True),                              # interval
    ("\\boxed{[0,1)}", "(0,1]", False),                             # open/closed ends matter
    ("the answer is 42", "42", True),                               # no box: last number
    ("\\boxed{} and the result is 7", "7", True),                   # empty box, number elsewhere
    ("I don't know", "3", False),
    ("", "3", False),
    # Multiple boxes: math-verify reads them as a set, so neither box alone matches.
    ("\\boxed{1} then \\boxed{2}", "2", False),
    ("\\boxed{1} then \\boxed{2}", "1, 2", True),
]


@pytest.mark.parametrize("pred,gold,expected", TRICKY)
def test_tricky_cases_in_process(pred, gold, expected):
    [r] = mg.grade_batch([pred], [gold], in_process=True)
    assert r.correct is expected, r
    assert not r.timed_out and r.error is None


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{3}", "3"),
    ("a \\boxed{1} b \\boxed{2}", "2"),                    # last wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),             # nested braces
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed {7}", "7"),
    ("\\boxed{}", ""),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                   # escaped braces
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{1} \\boxed{unclosed", "1"),
])
def test_extract_boxed(text, expected):
    assert mg.extract_boxed(text) == expected


def test_strict_boxed_and_has_boxed_are_format_only():
    assert mg.strict_boxed_answer("\\boxed{} so 7") is None
    assert mg.strict_boxed_answer("\\boxed{  }") is None
    assert mg.strict_boxed_answer("\\boxed{ 7 }") == "7"
    assert mg.has_boxed("\\boxed{}") and mg.has_boxed("\\fbox{1}") and not mg.has_boxed("box 1")
    # Correctness is independent of the strict format: the empty box still grades correct.
    [r] = mg.grade_batch(["\\boxed{} so 7"], ["7"], in_process=True)
    assert r.correct


def test_bad_gold_is_an_error_scored_zero():
    [r] = mg.grade_batch(["\\boxed{1}"], [""], in_process=True)
    assert not r.correct and r.error is not None and "ValueError" in r.error


def test_input_validation():
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        mg.grade_batch(["1", "2"], ["1"], in_process=True)
    with pytest.raises(TypeError, match=r"predictions\[0\] must be str"):
        mg.grade_batch([None], ["1"], in_process=True)
    with pytest.raises(ValueError, match="timeout_s"):
        mg.GradingConfig(timeout_s=0)
    with pytest.raises(ValueError, match="mp_context"):
        mg.GradingConfig(mp_context="threads")


def test_worker_pool_timeouts_and_pathological_inputs():
    """A 1 s outer timeout: pathological strings score 0 and are counted, the pool survives."""
    preds = [
        "\\boxed{3}",
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",        # deeply nested braces
        "9" * 100000,                                             # huge number, no box
        "\\boxed{10^{10^{10^{10}}}}",                             # tower exponent
        "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",        # deep parentheses
        "x \\boxed{4}",
    ]
    golds = ["3", "3", "3", "3", "3", "4"]
    cfg = mg.GradingConfig(timeout_s=1.0, workers=2)
    with mg.MathGrader(cfg) as grader:
        t0 = time.monotonic()
        results = grader.grade_batch(preds, golds)
        elapsed = time.monotonic() - t0
        # The pool is reused (and restarts killed workers) for the next call.
        again = grader.grade_batch(["\\boxed{12}"], ["12"])
    assert [r.correct for r in results] == [True, False, False, False, False, True]
    assert results[3].timed_out  # the tower exponent hits the outer timeout
    assert all(r.error is None for r in (results[0], results[5]))
    m = mg.grading_metrics(results)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["grade_timeouts"] >= 1
    assert elapsed < 30, elapsed
    assert again[0].correct
