"""Procedural math tasks: offline, exact answers, difficulty levels, seeded train/test split.

Four families, each with levels 1..NUM_LEVELS (1 = easiest):

* ``arithmetic``: level 1 is one addition of single digits ("What is 3 + 4?"); level 2 one
  subtraction or multiplication of single digits; then two-digit numbers, two operations
  (precedence, parentheses, negatives) and finally fractions.
* ``word_problem``: a story whose number of steps equals the level.
* ``linear_equation``: ``x + a = b`` at level 1 up to ``a(x + b) = cx + d`` with a fractional root.
* ``polynomial``: coefficient matching, e.g. the seed problem
  "(3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b" (answer -1) at level 4.

Answers are integers or reduced fractions in LaTeX (``\\frac{p}{q}``, ``-\\frac{p}{q}``).
Generation is a pure function of the seed; the split dedupes by normalised question so no
question appears in both train and test.
"""

from __future__ import annotations

import hashlib
import random
import re
from fractions import Fraction
from typing import Callable, Sequence

from rema_jax.tasks.types import Task

NUM_LEVELS = 5
FAMILIES = ("arithmetic", "word_problem", "linear_equation", "polynomial")


def format_number(x: Fraction | int) -> str:
    """Exact LaTeX for an integer or a fraction: ``7``, ``-3``, ``\\frac{2}{3}``, ``-\\frac{5}{4}``."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def normalize_question(q: str) -> str:
    """Canonical form used for dedupe: lower case, single spaces, no trailing punctuation."""
    return re.sub(r"\s+", " ", q.strip().lower()).rstrip(".?! ")


def _nz(rng: random.Random, lo: int, hi: int) -> int:
    """A random non-zero integer in [lo, hi]."""
    while True:
        v = rng.randint(lo, hi)
        if v:
            return v


def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


# ---------------------------------------------------------------- arithmetic

_OPS = {"+": (lambda a, b: a + b, "+"), "-": (lambda a, b: a - b, "-"), "*": (lambda a, b: a * b, "\\times")}


def _one_op(a: int, op: str, b: int) -> tuple[str, Fraction]:
    fn, sym = _OPS[op]
    return f"What is ${a} {sym} {b}$?", Fraction(fn(a, b))


def _arithmetic(rng: random.Random, level: int) -> tuple[str, Fraction]:
    if level == 1:  # one addition of single digits (SmolLM2-135M gets some of these right)
        return _one_op(rng.randint(1, 9), "+", rng.randint(1, 9))
    if level == 2:  # one subtraction (non-negative result) or multiplication of single digits
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        op = rng.choice("-*")
        if op == "-" and b > a:
            a, b = b, a
        return _one_op(a, op, b)
    if level == 3:  # one operation on two-digit numbers
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(11, 49), rng.randint(2, 9)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if op == "-" and b > a:
                a, b = b, a
        return _one_op(a, op, b)
    if level == 4:  # two operations: precedence, or parentheses with negatives
        if rng.random() < 0.5:
            a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
            if rng.random() < 0.5:
                return f"Compute ${a} + {b} \\times {c}$.", Fraction(a + b * c)
            return f"Compute ${a} \\times {b} - {c}$.", Fraction(a * b - c)
        a, b, c = _nz(rng, -15, 15), _nz(rng, -9, 9), rng.randint(2, 9)
        return f"Compute $({a} {_signed(b)}) \\times {c}$.", Fraction((a + b) * c)
    # level >= 5: fraction arithmetic, answer a reduced fraction
    p = Fraction(rng.randint(1, 9), rng.randint(2, 9))
    q = Fraction(rng.randint(1, 9), rng.randint(2, 9))
    op = rng.choice("+-*")
    fn, sym = _OPS[op]
    return (
        f"Compute $\\frac{{{p.numerator}}}{{{p.denominator}}} {sym} "
        f"\\frac{{{q.numerator}}}{{{q.denominator}}}$. Give the answer as a reduced fraction.",
        fn(p, q),
    )


# ---------------------------------------------------------------- word problems

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "coins", "books")


def _word_problem(rng: random.Random, level: int) -> tuple[str, Fraction]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    count = rng.randint(3, 12) if level <= 2 else rng.randint(5, 30)
    sentences = [f"{name} has {count} {item}."]
    for step in range(level):
        choices = ["buy", "give"]
        if step > 0 or level >= 3:
            choices += ["times", "share"]
        kind = rng.choice(choices)
        if kind == "give" and count <= 1:
            kind = "buy"
        if kind == "share":
            divisors = [k for k in range(2, 6) if count % k == 0]
            if not divisors:
                kind = "buy"
        if kind == "buy":
            k = rng.randint(2, 9 if level <= 2 else 20)
            sentences.append(f"{name} buys {k} more {item}.")
            count += k
        elif kind == "give":
            k = rng.randint(1, min(count - 1, 9 if level <= 2 else 20))
            sentences.append(f"{name} gives {k} {item} to {other}.")
            count -= k
        elif kind == "times":
            k = rng.randint(2, 4)
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
            sentences.append(f"Then {name} {word} the number of {item}.")
            count *= k
        else:
            k = rng.choice(divisors)
            sentences.append(f"{name} splits the {item} equally into {k} bags and keeps only one bag.")
            count //= k
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), Fraction(count)


# ---------------------------------------------------------------- linear equations


def _linear_equation(rng: random.Random, level: int) -> tuple[str, Fraction]:
    if level == 1:  # x + a = b
        x, a = rng.randint(1, 9), rng.randint(1, 9)
        return f"Solve for $x$: $x + {a} = {x + a}$.", Fraction(x)
    if level == 2:  # a x = b
        x, a = _nz(rng, -9, 12), rng.randint(2, 9)
        return f"Solve for $x$: ${a}x = {a * x}$.", Fraction(x)
    if level == 3:  # a x + b = c
        x, a, b = _nz(rng, -10, 10), rng.randint(2, 9), _nz(rng, -20, 20)
        return f"Solve for $x$: ${a}x {_signed(b)} = {a * x + b}$.", Fraction(x)
    if level == 4:  # a x + b = c x + d, integer root
        x, a, b = _nz(rng, -10, 10), rng.randint(2, 12), _nz(rng, -20, 20)
        c = rng.choice([v for v in range(-9, 10) if v not in (0, a)])
        d = a * x + b - c * x
        return f"Solve for $x$: ${a}x {_signed(b)} = {c}x {_signed(d)}$.", Fraction(x)
    # level >= 5: a(x + b) = c x + d with a fractional root
    while True:
        a, b = rng.randint(2, 9), _nz(rng, -9, 9)
        c = rng.choice([v for v in range(-9, 10) if v not in (0, a)])
        d = _nz(rng, -30, 30)
        x = Fraction(d - a * b, a - c)
        if x.denominator != 1:
            return (
                f"Solve for $x$: ${a}(x {_signed(b)}) = {c}x {_signed(d)}$. Give the answer as a reduced fraction.",
                x,
            )


# ---------------------------------------------------------------- polynomial coefficient matching


def _poly_str(coeffs: Sequence[int | str], var: str = "t") -> str:
    """Renders coefficients (highest degree first; str entries are unknowns) as LaTeX."""
    deg = len(coeffs) - 1
    out = []
    for i, c in enumerate(coeffs):
        p = deg - i
        mono = "" if p == 0 else (var if p == 1 else f"{var}^{p}")
        if isinstance(c, str):
            term, neg = (c + mono if mono else c), False
        else:
            if c == 0:
                continue
            neg = c < 0
            mag = abs(c)
            term = (str(mag) if mag != 1 or not mono else "") + mono
        if not out:
            out.append(("-" if neg else "") + term)
        else:
            out.append(("- " if neg else "+ ") + term)
    return " ".join(out) if out else "0"


def _poly_mul(p: Sequence[int], q: Sequence[int]) -> list[int]:
    out = [0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _polynomial(rng: random.Random, level: int) -> tuple[str, Fraction]:
    if level == 1:  # (t + a)(t + b) with a known, find b
        a, b = _nz(rng, -6, 6), _nz(rng, -6, 6)
        prod = _poly_mul([1, a], [1, b])
        return (f"Find $b$ if $({_poly_str([1, a])})(t + b) = {_poly_str(prod)}$ for all $t$.", Fraction(b))
    if level == 2:  # (a t + s)(q t + b), find a + b; each unknown fixed by one coefficient
        a, s, q, b = rng.randint(2, 6), _nz(rng, -7, 7), rng.randint(1, 5), _nz(rng, -7, 7)
        prod = _poly_mul([a, s], [q, b])
        return (
            f"If $(at {_signed(s)})({_poly_str([q, 'b'])}) = {_poly_str(prod)}$ for all $t$, find $a + b$.",
            Fraction(a + b),
        )
    if level == 3:  # (p t^2 + q t + a)(r t + b), find a + b
        p, q, r = rng.randint(1, 5), _nz(rng, -6, 6), rng.randint(1, 5)
        a, b = _nz(rng, -7, 7), _nz(rng, -7, 7)
        prod = _poly_mul([p, q, a], [r, b])
        return (
            f"If $({_poly_str([p, q, 'a'])})({_poly_str([r, 'b'])}) = {_poly_str(prod)}$ for all $t$, find $a + b$.",
            Fraction(a + b),
        )
    if level == 4:  # the seed shape: (p t^2 + q t + a)(r t^2 + b t + s), find a + b
        p, r = rng.randint(1, 5), rng.randint(1, 5)
        q, s = _nz(rng, -7, 7), _nz(rng, -5, 5)
        a, b = _nz(rng, -7, 7), _nz(rng, -7, 7)
        prod = _poly_mul([p, q, a], [r, b, s])
        return (
            f"Solve $({_poly_str([p, q, 'a'])})({_poly_str([r, 'b', s])}) = {_poly_str(prod)}$ "
            "for all $t$; find $a + b$.",
            Fraction(a + b),
        )
    # level >= 5: three unknowns, find a b c. b = c0 / s; then the t^3 and t^1 equations are
    # linear in (a, c) with determinant p s - b r, so p s != b r makes the answer unique.
    while True:
        p, r = rng.randint(2, 6), rng.randint(2, 6)
        a, b, c = _nz(rng, -6, 6), _nz(rng, -6, 6), _nz(rng, -6, 6)
        s = _nz(rng, -5, 5)
        if p * s != b * r:
            break
    prod = _poly_mul([p, a, b], [r, c, s])
    return (
        f"Find $abc$ if $({_poly_str([p, 'a', 'b'])})({_poly_str([r, 'c', s])}) = {_poly_str(prod)}$ for all $t$.",
        Fraction(a * b * c),
    )


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, Fraction]]] = {
    "arithmetic": _arithmetic,
    "word_problem": _word_problem,
    "linear_equation": _linear_equation,
    "polynomial": _polynomial,
}

SEED_EXAMPLE = Task(
    uid="builtin/seed",
    question="Solve $(3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6$ for all $t$; find $a + b$.",
    answer="-1",
    level=4,
    subject="polynomial",
    source="builtin",
)


def make_task(family: str, level: int, rng: random.Random) -> Task:
    """One task of `family` at `level`, drawn from `rng`; uid is a hash of the question."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown builtin family {family!r}; expected one of {FAMILIES}")
    if not 1 <= level <= NUM_LEVELS:
        raise ValueError(f"builtin level must be in 1..{NUM_LEVELS}, got {level}")
    question, value = _GENERATORS[family](rng, level)
    digest = hashlib.sha1(normalize_question(question).encode()).hexdigest()[:12]
    return Task(
        uid=f"builtin/{family}/{level}/{digest}",
        question=question,
        answer=format_number(value),
        level=level,
        subject=family,
        source="builtin",
    )


def generate_unique(
    family: str, level: int, n: int, rng: random.Random, seen: set[str] | None = None, max_tries_per_task: int = 200
) -> list[Task]:
    """`n` tasks of one (family, level) cell whose normalised questions are all new to `seen`."""
    seen = set() if seen is None else seen
    out: list[Task] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries_per_task * max(n, 1):
            raise ValueError(
                f"builtin {family} level {level}: only {len(out)} unique questions found "
                f"after {tries - 1} draws, {n} requested; ask for fewer"
            )
        task = make_task(family, level, rng)
        key = normalize_question(task.question)
        if key in seen:
            continue
        seen.add(key)
        out.append(task)
    return out


def builtin_split(
    num_train_per_cell: int,
    num_test_per_cell: int,
    *,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
    levels: Sequence[int] = tuple(range(1, NUM_LEVELS + 1)),
) -> tuple[list[Task], list[Task]]:
    """A reproducible train/test split with no shared normalised question.

    Each (family, level) cell draws ``num_train + num_test`` unique questions from its own
    RNG stream (seeded by ``(seed, family, level)``, so adding a family does not change the
    others), shuffles them and cuts. Dedupe is global across cells. Returns ``(train, test)`` ordered by family, level.
    """
    train, test = [], []
    seen: set[str] = set()
    for family in families:
        for level in levels:
            cell_seed = int(hashlib.sha256(f"{seed}/{family}/{level}".encode()).hexdigest()[:16], 16)
            rng = random.Random(cell_seed)
            tasks = generate_unique(family, level, num_train_per_cell + num_test_per_cell, rng, seen)
            rng.shuffle(tasks)
            test.extend(tasks[:num_test_per_cell])
            train.extend(tasks[num_test_per_cell:])
    return train, test
