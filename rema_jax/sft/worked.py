"""Worked examples for the built-in tasks: a plan for the MTA, a step-by-step solution for the RA.

The built-in generator (``rema_jax.tasks.builtin``) stores only the question and the gold answer,
so each family is re-solved here from the numbers in the question text (the question formats are
fixed by the generator). Every solution is checked against ``Task.answer``: a question this module
cannot parse, or solves to a different value, raises ``WorkedExampleError`` instead of producing a
wrong training target.

* plan (MTA): numbered steps naming the operations on the question's numbers, ending with
  "Do not give the final number." It never contains the answer or ``\\boxed``.
* solution (RA): the same steps with their intermediate values, ending in ``\\boxed{answer}``.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import re
from fractions import Fraction

from rema_jax.errors import UserError
from rema_jax.tasks.builtin import format_number
from rema_jax.tasks.types import Task


class WorkedExampleError(ValueError, UserError):
    """A built-in question could not be re-solved into a worked example (names the task uid)."""


@dataclasses.dataclass(frozen=True)
class WorkedExample:
    """A plan (meta-thinking agent) and a solution (reasoning agent) for one task."""

    task: Task
    plan: str
    solution: str
    value: Fraction


def _num(x: Fraction | int) -> str:
    return format_number(Fraction(x))


def _paren(x: Fraction | int) -> str:
    """A number as an operand: negatives in parentheses."""
    s = _num(x)
    return f"({s})" if Fraction(x) < 0 else s


def _finish(steps: list[str], plan: list[str], value: Fraction) -> tuple[str, str]:
    plan_text = "\n".join(f"{i}. {p}" for i, p in enumerate(plan, 1)) + "\nDo not give the final number."
    solution = "\n".join(steps) + f"\nThe final answer is $\\boxed{{{_num(value)}}}$."
    return plan_text, solution


# ---------------------------------------------------------------- arithmetic

_OP_WORDS = {ast.Add: ("+", "add"), ast.Sub: ("-", "subtract"), ast.Mult: ("\\times", "multiply")}
_EXPR_RE = re.compile(r"\$(.+?)\$")


def _latex_to_python(expr: str) -> str:
    expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"(\1/\2)", expr)
    return expr.replace("\\times", "*")


def _is_fraction_leaf(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Div)
        and isinstance(node.left, ast.Constant)
        and isinstance(node.right, ast.Constant)
    )


def _arithmetic(question: str) -> tuple[str, str, Fraction]:
    m = _EXPR_RE.search(question)
    if m is None:
        raise ValueError("no $...$ expression")
    tree = ast.parse(_latex_to_python(m.group(1)), mode="eval").body
    steps: list[str] = []
    plan: list[str] = []

    def walk(node) -> tuple[Fraction, str, bool]:
        """(value, LaTeX of the operand as written, is it an earlier result)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value), _num(node.value), False
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v, _, _ = walk(node.operand)
            return -v, _paren(-v), False
        if _is_fraction_leaf(node):
            v = Fraction(node.left.value, node.right.value)
            return v, _num(v), False
        if isinstance(node, ast.BinOp) and type(node.op) in _OP_WORDS:
            lv, ls, lr = walk(node.left)
            rv, rs, rr = walk(node.right)
            sym, word = _OP_WORDS[type(node.op)]
            value = {ast.Add: lv + rv, ast.Sub: lv - rv, ast.Mult: lv * rv}[type(node.op)]
            lhs = f"{_paren(lv) if lr else ls} {sym} {_paren(rv) if rr else rs}"
            if isinstance(node.op, (ast.Add, ast.Sub)) and (lv.denominator != 1 or rv.denominator != 1):
                d = lv.denominator * rv.denominator // math.gcd(lv.denominator, rv.denominator)
                a, b = lv.numerator * (d // lv.denominator), rv.numerator * (d // rv.denominator)
                steps.append(
                    f"Use the common denominator {d}: ${lhs} = \\frac{{{a}}}{{{d}}} {sym} "
                    f"\\frac{{{b}}}{{{d}}} = \\frac{{{a + b if sym == '+' else a - b}}}{{{d}}}$."
                )
                if value.denominator != d:
                    steps.append(
                        f"Reduce the fraction: $\\frac{{{a + b if sym == '+' else a - b}}}{{{d}}} = {_num(value)}$."
                    )
            elif isinstance(node.op, ast.Mult) and (lv.denominator != 1 or rv.denominator != 1):
                num, den = lv.numerator * rv.numerator, lv.denominator * rv.denominator
                steps.append(f"Multiply numerators and denominators: ${lhs} = \\frac{{{num}}}{{{den}}}$.")
                if math.gcd(num, den) != 1:
                    steps.append(f"Reduce the fraction: $\\frac{{{num}}}{{{den}}} = {_num(value)}$.")
            else:
                steps.append(f"${lhs} = {_num(value)}$.")
            left = "the previous result" if lr else f"${ls}$"
            right = "the previous result" if rr else f"${rs}$"
            plan.append(
                {
                    "add": f"Add {left} and {right}.",
                    "subtract": f"Subtract {right} from {left}.",
                    "multiply": f"Multiply {left} by {right}.",
                }[word]
            )
            return value, _num(value), True
        raise ValueError(f"unsupported expression node {ast.dump(node)}")

    value, _, _ = walk(tree)
    if len(plan) > 1:
        plan[0] = "First " + plan[0][0].lower() + plan[0][1:]
    if "reduced fraction" in question:
        plan.append("Write the result as a reduced fraction.")
    plan_text, solution = _finish(steps, plan, value)
    return plan_text, solution, value


# ---------------------------------------------------------------- word problems

_WP_START = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_WP_BUY = re.compile(r"^(\w+) buys (\d+) more (\w+)\.$")
_WP_GIVE = re.compile(r"^(\w+) gives (\d+) (\w+) to (\w+)\.$")
_WP_TIMES = re.compile(r"^Then (\w+) (doubles|triples|quadruples) the number of (\w+)\.$")
_WP_SHARE = re.compile(r"^(\w+) splits the (\w+) equally into (\d+) bags and keeps only one bag\.$")
_WP_ASK = re.compile(r"^How many (\w+) does (\w+) have now\?$")
_TIMES = {"doubles": 2, "triples": 3, "quadruples": 4}


def _word_problem(question: str) -> tuple[str, str, Fraction]:
    sentences = re.split(r"(?<=[.?])\s+", question.strip())
    m = _WP_START.match(sentences[0])
    if m is None or _WP_ASK.match(sentences[-1]) is None:
        raise ValueError("not a word problem of the generator's form")
    name, count, item = m.group(1), int(m.group(2)), m.group(3)
    plan = [f"Start from the {count} {item} {name} has."]
    steps = [f"{name} starts with {count} {item}."]
    for s in sentences[1:-1]:
        if m := _WP_BUY.match(s):
            k = int(m.group(2))
            plan.append(f"Add the {k} {item} {name} buys.")
            steps.append(f"After buying {k} more: ${count} + {k} = {count + k}$.")
            count += k
        elif m := _WP_GIVE.match(s):
            k = int(m.group(2))
            plan.append(f"Subtract the {k} {item} given to {m.group(4)}.")
            steps.append(f"After giving away {k}: ${count} - {k} = {count - k}$.")
            count -= k
        elif m := _WP_TIMES.match(s):
            k = _TIMES[m.group(2)]
            plan.append(f"Multiply the current number by {k} ({name} {m.group(2)} the {item}).")
            steps.append(f"After multiplying by {k}: ${count} \\times {k} = {count * k}$.")
            count *= k
        elif m := _WP_SHARE.match(s):
            k = int(m.group(3))
            plan.append(f"Divide the current number by {k}, since {name} keeps one of {k} equal bags.")
            steps.append(f"Keeping one of {k} equal bags: ${count} \\div {k} = {count // k}$.")
            count //= k
        else:
            raise ValueError(f"unknown word-problem sentence {s!r}")
    plan.append(f"The number left after the last step is how many {item} {name} has.")
    steps.append(f"So {name} has {count} {item} now.")
    plan_text, solution = _finish(steps, plan, Fraction(count))
    return plan_text, solution, Fraction(count)


# ---------------------------------------------------------------- linear equations

_SIDE_RE = re.compile(r"^(?:(-?\d*)\(x ([+-]) (\d+)\)|(-?\d*)x)?\s*(?:([+-])\s*(\d+))?$|^(-?\d+)$")


def _linear_side(side: str) -> tuple[Fraction, Fraction, str | None]:
    """``ax + b`` / ``a(x + b)`` / ``c`` → (coefficient of x, constant, expansion text or None)."""
    side = side.strip()
    m = _SIDE_RE.match(side)
    if m is None:
        raise ValueError(f"cannot parse linear side {side!r}")
    if m.group(7) is not None:
        return Fraction(0), Fraction(int(m.group(7))), None
    if m.group(3) is not None:  # a(x ± b)
        a = int(m.group(1)) if m.group(1) not in ("", "-") else (-1 if m.group(1) == "-" else 1)
        b = int(m.group(3)) * (1 if m.group(2) == "+" else -1)
        c0 = Fraction(0)
        if m.group(6) is not None:
            c0 = Fraction(int(m.group(6)) * (1 if m.group(5) == "+" else -1))
        expanded = f"{a}x {'+' if a * b >= 0 else '-'} {abs(a * b)}"
        return Fraction(a), Fraction(a * b) + c0, f"${side} = {expanded}$"
    coef_txt = m.group(4)
    a = 0 if coef_txt is None else (1 if coef_txt == "" else -1 if coef_txt == "-" else int(coef_txt))
    b = 0 if m.group(6) is None else int(m.group(6)) * (1 if m.group(5) == "+" else -1)
    return Fraction(a), Fraction(b), None


def _xterm(coef: Fraction) -> str:
    return "x" if coef == 1 else ("-x" if coef == -1 else f"{_num(coef)}x")


def _linear_equation(question: str) -> tuple[str, str, Fraction]:
    m = re.search(r"Solve for \$x\$: \$(.+?) = (.+?)\$", question)
    if m is None:
        raise ValueError("not a linear equation of the generator's form")
    (a, b, exp_l), (c, d, exp_r) = _linear_side(m.group(1)), _linear_side(m.group(2))
    coef, rhs = a - c, d - b
    if coef == 0:
        raise ValueError("the equation has no unique solution")
    x = rhs / coef
    plan, steps = [], []
    if exp_l or exp_r:
        plan.append("Expand the parentheses.")
        steps.extend(f"Expand: {e}." for e in (exp_l, exp_r) if e)
    if c != 0:
        plan.append("Move all the $x$ terms to the left side and the constants to the right side.")
    elif b != 0:
        plan.append("Move the constant term to the right side.")
    steps.append(
        f"Collect terms: $({_num(a)} - {_paren(c)})x = {_paren(d)} - {_paren(b)}$, so ${_xterm(coef)} = {_num(rhs)}$."
        if c != 0
        else (
            f"Subtract {_num(b)} from both sides: ${_xterm(coef)} = {_num(d)} - {_num(b)} = {_num(rhs)}$."
            if b > 0
            else f"Add {_num(-b)} to both sides: ${_xterm(coef)} = {_num(d)} + {_num(-b)} = {_num(rhs)}$."
        )
        if b != 0
        else f"The equation is ${_xterm(coef)} = {_num(rhs)}$."
    )
    if coef != 1:
        plan.append("Divide both sides by the coefficient of $x$.")
        steps.append(f"Divide by {_paren(coef)}: $x = \\frac{{{_num(rhs)}}}{{{_num(coef)}}} = {_num(x)}$.")
    if "reduced fraction" in question:
        plan.append("Give $x$ as a reduced fraction.")
    steps.append(f"Check: substituting $x = {_num(x)}$ makes both sides equal to {_num(a * x + b)}.")
    plan_text, solution = _finish(steps, plan, x)
    return plan_text, solution, x


# ---------------------------------------------------------------- polynomial coefficient matching

_TERM_RE = re.compile(r"([+-])?\s*(\d*|[a-z])(t(?:\^(\d+))?)?$")


def _parse_poly(text: str, var: str = "t") -> dict[int, int | str]:
    """``3t^2 + 5t + a`` → {2: 3, 1: 5, 0: "a"} (unknowns as one-letter names)."""
    terms = re.findall(r"[+-]?\s*(?:\d+|[a-z](?!\^)|)(?:t(?:\^\d+)?)?", text.replace(" ", ""))
    out: dict[int, int | str] = {}
    for term in filter(None, (t.strip() for t in terms)):
        m = re.fullmatch(r"([+-]?)(\d*|[a-su-z])(t(?:\^(\d+))?)?", term)
        if m is None or (not m.group(2) and not m.group(3)):
            raise ValueError(f"cannot parse polynomial term {term!r} in {text!r}")
        sign = -1 if m.group(1) == "-" else 1
        power = 0 if not m.group(3) else int(m.group(4) or 1)
        coef = m.group(2)
        if coef.isalpha():
            if sign < 0:
                raise ValueError(f"negated unknown in {text!r}")
            out[power] = coef
        else:
            out[power] = sign * (int(coef) if coef else 1)
    return out


def _coef_terms(f: dict, g: dict, power: int) -> list[tuple]:
    return [(f[i], g[power - i]) for i in sorted(f, reverse=True) if power - i in g]


def _render_product(x, y, known: dict[str, int]) -> str:
    """One product of the expanded coefficient, known unknowns replaced by their values."""
    x, y = known.get(x, x), known.get(y, y)
    return f"{_paren(x) if isinstance(x, int) else x} \\cdot {_paren(y) if isinstance(y, int) else y}"


def _power_name(p: int) -> str:
    return "the constant term" if p == 0 else ("the coefficient of $t$" if p == 1 else f"the coefficient of $t^{p}$")


def _polynomial(question: str) -> tuple[str, str, Fraction]:
    m = re.search(r"\$\((.+?)\)\((.+?)\) = (.+?)\$", question)
    if m is None:
        raise ValueError("not a coefficient-matching question of the generator's form")
    f, g, target = _parse_poly(m.group(1)), _parse_poly(m.group(2)), _parse_poly(m.group(3))
    if any(isinstance(v, str) for v in target.values()):
        raise ValueError("unknowns on the right-hand side")
    unknowns = sorted({v for v in itertools.chain(f.values(), g.values()) if isinstance(v, str)})
    if not unknowns:
        raise ValueError("no unknowns")
    top = max(f) + max(g)
    want = {p: int(target.get(p, 0)) for p in range(top + 1)}

    def product(values: dict[str, int]) -> dict[int, int]:
        fv = {p: values.get(c, c) if isinstance(c, str) else c for p, c in f.items()}
        gv = {p: values.get(c, c) if isinstance(c, str) else c for p, c in g.items()}
        return {p: sum(a * b for a, b in _coef_terms(fv, gv, p)) for p in range(top + 1)}

    sols = [
        dict(zip(unknowns, vals))
        for vals in itertools.product(range(-12, 13), repeat=len(unknowns))
        if product(dict(zip(unknowns, vals))) == want
    ]
    if len(sols) != 1:
        raise ValueError(f"{len(sols)} integer solutions for {unknowns} in [-12, 12]")
    sol = sols[0]
    # Narrate: match one coefficient at a time, solving for one new unknown when possible.
    known: dict[str, int] = {}
    steps = ["Expand the left side and match the coefficient of each power of $t$ with the right side."]
    plan = ["Expand the product on the left and match coefficients of equal powers of $t$."]
    order = [0, top] + list(range(1, top))
    progress = True
    while len(known) < len(unknowns) and progress:
        progress = False
        for p in order:
            terms = _coef_terms(f, g, p)
            names = {v for t in terms for v in t if isinstance(v, str)} - set(known)
            if len(names) != 1:
                continue
            u = names.pop()
            if any(t[0] == u and t[1] == u for t in terms):
                continue
            lhs = " + ".join(_render_product(*t, known) for t in terms)
            steps.append(f"Matching {_power_name(p)}: ${lhs} = {want[p]}$, so ${u} = {sol[u]}$.")
            plan.append(f"Use {_power_name(p)} to find ${u}$.")
            known[u] = sol[u]
            progress = True
            break
    rest = [u for u in unknowns if u not in known]
    if rest:
        eqs = []
        for p in order:
            terms = _coef_terms(f, g, p)
            if {v for t in terms for v in t if isinstance(v, str)} & set(rest):
                eqs.append(f"${' + '.join(_render_product(*t, known) for t in terms)} = {want[p]}$")
            if len(eqs) == len(rest):
                break
        names = ", ".join(f"${u}$" for u in rest)
        plan.append(f"Solve the remaining equations together for {names}.")
        steps.append(
            f"With {', '.join(f'${k} = {v}$' for k, v in known.items())}, the equations "
            f"{' and '.join(eqs)} give {', '.join(f'${u} = {sol[u]}$' for u in rest)}."
        )
    ask = re.search(r"find \$(.+?)\$", question, re.IGNORECASE) or re.search(r"Find \$(.+?)\$", question)
    if ask is None:
        raise ValueError("the question does not say what to find")
    wanted = ask.group(1).replace(" ", "")
    if wanted == "a+b":
        value = Fraction(sol["a"] + sol["b"])
        steps.append(f"Therefore $a + b = {sol['a']} + {_paren(sol['b'])} = {value}$.")
        plan.append("Add $a$ and $b$.")
    elif wanted == "abc":
        value = Fraction(sol["a"] * sol["b"] * sol["c"])
        steps.append(f"Therefore $abc = {sol['a']} \\cdot {_paren(sol['b'])} \\cdot {_paren(sol['c'])} = {value}$.")
        plan.append("Multiply $a$, $b$ and $c$.")
    elif len(wanted) == 1 and wanted in sol:
        value = Fraction(sol[wanted])
        plan.append(f"Report ${wanted}$.")
    else:
        raise ValueError(f"unsupported target ${wanted}$")
    plan_text, solution = _finish(steps, plan, value)
    return plan_text, solution, value


_SOLVERS = {
    "arithmetic": _arithmetic,
    "word_problem": _word_problem,
    "linear_equation": _linear_equation,
    "polynomial": _polynomial,
}


def worked_example(task: Task) -> WorkedExample:
    """The plan and step-by-step solution of a built-in task, checked against its gold answer."""
    solver = _SOLVERS.get(task.subject)
    if solver is None or task.source != "builtin":
        raise WorkedExampleError(
            f"{task.uid}: worked examples exist for built-in tasks of families "
            f"{sorted(_SOLVERS)}, got source={task.source!r} subject={task.subject!r}"
        )
    try:
        plan, solution, value = solver(task.question)
    except (ValueError, SyntaxError, ZeroDivisionError) as e:
        raise WorkedExampleError(f"{task.uid}: cannot re-solve {task.question!r}: {e}") from None
    if _num(value) != task.answer:
        raise WorkedExampleError(
            f"{task.uid}: re-solved {task.question!r} to {_num(value)}, but the gold answer is {task.answer}"
        )
    if "\\boxed" in plan:
        raise WorkedExampleError(f"{task.uid}: the plan gives the answer away")
    return WorkedExample(task=task, plan=plan, solution=solution, value=value)
