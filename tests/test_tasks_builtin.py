"""Built-in procedural tasks: exact answers, levels, reproducible non-overlapping split."""

import itertools
import random
import re
from fractions import Fraction

import pytest

from rema_jax.tasks import builtin
from rema_jax.tasks.types import Task


def _parse_answer(s: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return Fraction(int(s))


@pytest.mark.parametrize(
    "value,expected",
    [
        (Fraction(7), "7"),
        (Fraction(-3), "-3"),
        (Fraction(2, 4), "\\frac{1}{2}"),
        (Fraction(-5, 4), "-\\frac{5}{4}"),
        (0, "0"),
    ],
)
def test_format_number(value, expected):
    assert builtin.format_number(value) == expected


def test_seed_example_answer():
    # (3t^2+5t+a)(4t^2+bt-2): constant -2a = 6 -> a = -3; t^3: 3b + 20 = 26 -> b = 2.
    assert builtin.SEED_EXAMPLE.answer == "-1"
    assert builtin._poly_mul([3, 5, -3], [4, 2, -2]) == [12, 26, -8, -16, 6]


def test_low_arithmetic_levels_are_one_small_operation():
    rng = random.Random(0)
    for level, ops in ((1, {"+"}), (2, {"-", "\\times"})):
        seen = set()
        for _ in range(50):
            t = builtin.make_task("arithmetic", level, rng)
            m = re.fullmatch(r"What is \$(\d) (\+|-|\\times) (\d)\$\?", t.question)
            assert m, t.question
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert int(t.answer) == {"+": a + b, "-": a - b, "\\times": a * b}[op] >= 0
            seen.add(op)
        assert seen == ops


def _eval_linear(question: str) -> Fraction:
    body = re.search(r"\$: \$(.*)\$", question).group(1)
    lhs, rhs = body.split("=")

    def coeffs(side):  # returns (coef of x, constant) for "a(x + b)", "ax + b", "x + a", "c"
        side = side.replace(" ", "")
        m = re.fullmatch(r"(-?\d+)\(x([+-]\d+)\)", side)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            return Fraction(a), Fraction(a * b)
        m = re.fullmatch(r"(-?\d*)x([+-]\d+)?", side)
        if m:
            a = m.group(1)
            a = 1 if a == "" else (-1 if a == "-" else int(a))
            return Fraction(a), Fraction(int(m.group(2) or 0))
        return Fraction(0), Fraction(int(side))

    (a, b), (c, d) = coeffs(lhs), coeffs(rhs)
    return (d - b) / (a - c)


@pytest.mark.parametrize("level", range(1, builtin.NUM_LEVELS + 1))
def test_linear_answers_solve_the_equation(level):
    rng = random.Random(level)
    for _ in range(30):
        t = builtin.make_task("linear_equation", level, rng)
        assert _parse_answer(t.answer) == _eval_linear(t.question), t.question


@pytest.mark.parametrize("level", range(1, builtin.NUM_LEVELS + 1))
def test_arithmetic_answers_match_python(level):
    rng = random.Random(100 + level)
    for _ in range(30):
        t = builtin.make_task("arithmetic", level, rng)
        expr = re.search(r"\$(.*)\$", t.question).group(1)
        expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"Fraction(\1, \2)", expr).replace("\\times", "*")
        assert _parse_answer(t.answer) == Fraction(eval(expr)), t.question  # pylint: disable=eval-used


def _poly_from_latex(s: str) -> dict[int, int]:
    out = {}
    for sign, coef, var, power in re.findall(r"([+-]?)\s*(\d*)(t?)(?:\^(\d))?", s.replace(" ", "")):
        if not coef and not var:
            continue
        c = int(coef) if coef else 1
        p = int(power) if power else (1 if var else 0)
        out[p] = -c if sign == "-" else c
    return out


@pytest.mark.parametrize("level", range(1, builtin.NUM_LEVELS + 1))
def test_polynomial_answers_expand_back(level):
    """Substitutes the unknowns found by brute force and checks the answer is unique."""
    rng = random.Random(200 + level)
    for _ in range(4 if level == 5 else 10):
        t = builtin.make_task("polynomial", level, rng)
        m = re.search(r"\$\((.*)\)\((.*)\) = (.*)\$ for all", t.question)
        f1, f2, rhs = m.group(1), m.group(2), _poly_from_latex(m.group(3))
        unknowns = sorted(set(re.findall(r"[abc]", f1 + f2)))
        solutions = set()
        for vals in itertools.product(range(-7, 8), repeat=len(unknowns)):  # generator range: |v| <= 7
            env = dict(zip(unknowns, vals))

            def sub(s):
                return re.sub(
                    r"(\d)?([abc])",
                    lambda mm: f"{mm.group(1) or ''}*({env[mm.group(2)]})" if mm.group(1) else f"({env[mm.group(2)]})",
                    s,
                )

            lhs = {}
            for tt in range(-3, 4):  # evaluate both sides at 7 points (degree <= 4)
                expr = f"({sub(f1)})*({sub(f2)})".replace("t^2", "t**2")
                expr = re.sub(r"(\d)t", r"\1*t", expr).replace(")t", ")*t")
                lhs[tt] = eval(expr, {"t": tt})  # pylint: disable=eval-used
            if all(lhs[tt] == sum(c * tt**p for p, c in rhs.items()) for tt in lhs):
                solutions.add(tuple(vals))
        assert len(solutions) == 1, (t.question, solutions)
        vals = dict(zip(unknowns, solutions.pop()))
        target = re.search(r"find \$(.*?)\$|Find \$(.*?)\$", t.question)
        want = (target.group(1) or target.group(2)).replace(" ", "")
        got = {
            "b": vals.get("b"),
            "a+b": vals.get("a", 0) + vals.get("b", 0),
            "abc": vals.get("a", 1) * vals.get("b", 1) * vals.get("c", 1),
        }[want]
        assert int(t.answer) == got, t.question


def test_word_problem_steps_equal_level():
    rng = random.Random(5)
    for level in range(1, builtin.NUM_LEVELS + 1):
        t = builtin.make_task("word_problem", level, rng)
        assert t.question.count(".") == level + 1, t.question  # start + one sentence per step
        assert int(t.answer) > 0


def test_split_is_reproducible_and_disjoint():
    train, test = builtin.builtin_split(20, 8, seed=3)
    train2, test2 = builtin.builtin_split(20, 8, seed=3)
    assert [t.uid for t in train] == [t.uid for t in train2]
    assert [t.uid for t in test] == [t.uid for t in test2]
    assert len(train) == 20 * 4 * 5 and len(test) == 8 * 4 * 5

    def norm(ts):
        return {builtin.normalize_question(t.question) for t in ts}

    assert not norm(train) & norm(test)
    assert len(norm(train)) == len(train) and len(norm(test)) == len(test)
    other_train, _ = builtin.builtin_split(20, 8, seed=4)
    assert [t.uid for t in other_train] != [t.uid for t in train]
    # Restricting families leaves each remaining family's tasks unchanged.
    only, _ = builtin.builtin_split(20, 8, seed=3, families=("polynomial",))
    assert [t.uid for t in only] == [t.uid for t in train if t.subject == "polynomial"]


def test_split_refuses_more_than_the_cell_holds():
    with pytest.raises(ValueError, match="unique questions"):
        builtin.builtin_split(400, 100, families=("linear_equation",), levels=(1,))


def test_bad_family_and_level():
    with pytest.raises(ValueError, match="unknown builtin family"):
        builtin.make_task("geometry", 1, random.Random(0))
    with pytest.raises(ValueError, match="level"):
        builtin.make_task("arithmetic", 0, random.Random(0))


def test_task_validation_and_swap():
    with pytest.raises(ValueError, match="empty answer"):
        Task(uid="x", question="q", answer=" ")
    with pytest.raises(ValueError, match="label"):
        Task(uid="x", question="q", answer="A", kind="judge", response_a="a", response_b="b", label="A=B")
    t = Task(uid="p", question="q", answer="A", kind="judge", response_a="good", response_b="bad", label="A>B")
    s = t.swapped()
    assert (s.uid, s.response_a, s.response_b, s.label, s.answer) == ("p#swap", "bad", "good", "B>A", "B")
    assert Task.from_dict(t.to_dict()) == t
