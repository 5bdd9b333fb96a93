"""Math answer extraction and math-verify grading with hard timeouts.

Grading follows the official ReMA code (`verl/utils/reward_score/math_verify.py`) exactly:
the gold answer is wrapped as ``"\\boxed{" + gt + "}"`` and compared with

    math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))

on the *whole* final reasoning-agent message. math-verify prefers boxed answers but falls back
to the last number/expression, so correctness is deliberately independent of the answer
*format*; use `has_boxed` / `strict_boxed_answer` for format checks (SmolLM2 often writes an
empty ``\\boxed{}`` and the number elsewhere, which math-verify still grades).

Each verification runs in a killable worker process (a pebble `ProcessPool`, reused across
calls) with a per-sample timeout (10 s by default, like the official code). A timeout or an
exception scores 0 and is reported in the `GradeResult`, so a pathological string
(``"9" * 100000``, deeply nested braces, ``10^{10^{10^{10}}}``) can never hang or crash training.
An answer whose worker died is graded once more (on a fresh pool when pebble marked the pool
broken); if most of a batch still fails in the pool, `GradingError` names the cause instead of
handing training a batch of zero rewards.
`in_process=True` skips the pool (fast path for tests); it relies on math-verify's own
``signal.alarm`` timeouts only, so it must run in the main thread.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import re
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Optional, Sequence

from rema_jax.errors import UserError

_BOX_RE = re.compile(r"\\(boxed|fbox)\s*\{")


# ----------------------------------------------------------------------------------------------
# Extraction (pure string functions, no math-verify)
# ----------------------------------------------------------------------------------------------
def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every balanced ``\\boxed{...}``/``\\fbox{...}``."""
    spans = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return spans
        start = m.end()
        depth = 1
        i = start
        n = len(text)
        while i < n and depth:
            c = text[i]
            if c == "\\" and i + 1 < n and text[i + 1] in "{}":
                i += 2  # escaped brace \{ or \} does not change the depth
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth:  # unbalanced: the box never closes, nothing after it can be a box either
            return spans
        spans.append((start, i - 1))
        pos = i


def extract_boxed(text: str) -> Optional[str]:
    """Content of the LAST balanced ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept).

    Returns None when there is no closed box. The content is returned verbatim (may be "").
    """
    spans = _boxed_spans(text)
    if not spans:
        return None
    s, e = spans[-1]
    return text[s:e]


def has_boxed(text: str) -> bool:
    """True when the text contains ``\\boxed`` or ``\\fbox`` at all (the paper's 'answer format')."""
    return "\\boxed" in text or "\\fbox" in text


def strict_boxed_answer(text: str) -> Optional[str]:
    """The last box's content, stripped, or None when there is no box or it is empty.

    A format check only: correctness is graded by math-verify on the whole message.
    """
    content = extract_boxed(text)
    if content is None:
        return None
    content = content.strip()
    return content or None


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------
class GradingError(UserError, RuntimeError):
    """The grading pool cannot grade: most of a batch failed in it even after a restart."""


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one prediction.

    correct: math-verify judged the prediction equal to the gold answer.
    extracted: math-verify's extracted prediction (its LaTeX/expr string), None if nothing.
    timed_out: the outer worker timeout fired (scored 0).
    error: the exception text when grading raised or the worker died (scored 0), else None.
    """

    correct: bool
    extracted: Optional[str] = None
    timed_out: bool = False
    error: Optional[str] = None

    @property
    def score(self) -> float:
        return 1.0 if self.correct else 0.0


@dataclasses.dataclass(frozen=True)
class GradingConfig:
    """How correctness is graded.

    timeout_s: per-sample wall-clock limit in the worker (official: 10 s).
    workers: worker processes in the pool (official: 1).
    in_process: grade in the calling process (no pool, no outer timeout); tests/debug only.
    mp_context: multiprocessing start method for workers; "spawn" is safe with JAX threads.
    """

    timeout_s: float = 10.0
    workers: int = 1
    in_process: bool = False
    mp_context: str = "spawn"

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"GradingConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"GradingConfig.workers must be an int >= 1, got {self.workers!r}")
        valid = multiprocessing.get_all_start_methods()
        if self.mp_context not in valid:
            raise ValueError(f"GradingConfig.mp_context={self.mp_context!r}; valid: {valid}")


_METRIC = None


def _metric():
    """The official math-verify metric, built lazily once per process."""
    global _METRIC
    if _METRIC is None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, math_metric

        _METRIC = math_metric(
            gold_extraction_target=(LatexExtractionConfig(),),
            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
        )
    return _METRIC


def verify_answer(prediction: str, gold: str) -> tuple[bool, Optional[str]]:
    """Official check: (correct, extracted prediction string). May raise; no outer timeout."""
    score, strs = _metric()(["\\boxed{" + gold + "}"], [prediction])
    extracted = None
    if strs is not None and strs[1]:
        extracted = strs[1][-1]
    return bool(score >= 1.0), extracted


def _grade_one_safe(prediction: str, gold: str) -> GradeResult:
    """verify_answer turned into a GradeResult; any exception scores 0 (runs in the worker)."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        correct, extracted = verify_answer(prediction, gold)
        return GradeResult(correct=correct, extracted=extracted)
    except BaseException as e:  # noqa: BLE001 - math-verify can raise anything (incl. RecursionError)
        return GradeResult(correct=False, error=f"{type(e).__name__}: {e}"[:500])


def _worker_init():
    import logging
    import sys

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    sys.setrecursionlimit(10_000)
    _metric()  # import sympy/latex2sympy once per worker, not per task


class MathGrader:
    """A reusable pool of grading workers. Use as a context manager or call `close()`.

    ``grade_fn(prediction, gold) -> GradeResult`` runs in the worker for each pair (default: the
    official math-verify check); it must be picklable by reference (a module-level function).
    """

    def __init__(self, config: GradingConfig = GradingConfig(), *, grade_fn=None):
        self.config = config
        self._grade_fn = grade_fn or _grade_one_safe
        self._pool = None
        self._lock = threading.Lock()

    def _get_pool(self):
        with self._lock:
            if self._pool is not None and not self._pool.active:  # broken: e.g. a worker died idle
                pool, self._pool = self._pool, None
                pool.stop()
                pool.join()
            if self._pool is None:
                import pebble

                self._pool = pebble.ProcessPool(
                    max_workers=self.config.workers,
                    initializer=_worker_init,
                    context=multiprocessing.get_context(self.config.mp_context),
                )
            return self._pool

    def _attempt(self, pairs: Sequence[tuple[str, str]]) -> list:
        """One pass over the pool: per pair a GradeResult, or the exception the pool failed it with."""
        pool = self._get_pool()
        futures = []
        for p, g in pairs:
            try:
                futures.append(pool.schedule(self._grade_fn, args=(p, g), timeout=self.config.timeout_s))
            except RuntimeError as e:  # pebble: "Unexpected error within the Pool" (broke meanwhile)
                futures.append(e)
        pending = {f for f in futures if not isinstance(f, BaseException)}
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=1.0)
            if pending and not pool.active:
                # pebble fails the tasks it had taken when the pool broke; queued ones never run.
                _, pending = concurrent.futures.wait(pending, timeout=1.0)
                break
        out = []
        for fut in futures:
            if isinstance(fut, BaseException):
                out.append(fut)
            elif not fut.done():
                out.append(BrokenProcessPool("the pool broke before this answer was graded"))
            else:
                try:
                    out.append(fut.result())
                except concurrent.futures.TimeoutError:
                    out.append(
                        GradeResult(correct=False, timed_out=True, error=f"timeout after {self.config.timeout_s} s")
                    )
                except Exception as e:  # noqa: BLE001 - pebble.ProcessExpired, BrokenProcessPool, ...
                    out.append(e)
        return out

    def grade_batch(self, predictions: Sequence[str], golds: Sequence[str]) -> list[GradeResult]:
        """Grade predictions[i] against golds[i]; never raises for bad model output.

        Raises GradingError when, after one retry, more than half of the batch failed in the pool
        (dead workers, a broken pool), not in grading: those are not the answers' fault.
        """
        if len(predictions) != len(golds):
            raise ValueError(f"grade_batch: {len(predictions)} predictions but {len(golds)} gold answers")
        for name, seq in (("predictions", predictions), ("golds", golds)):
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise TypeError(f"grade_batch: {name}[{i}] must be str, got {type(s).__name__}")
        if self.config.in_process:
            return [self._grade_fn(p, g) for p, g in zip(predictions, golds)]
        pairs = list(zip(predictions, golds))
        results = self._attempt(pairs)
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:  # a worker died or the pool broke: once more (a broken pool is recreated)
            for i, r in zip(failed, self._attempt([pairs[i] for i in failed])):
                results[i] = r
            failed = [i for i in failed if isinstance(results[i], BaseException)]
        if 2 * len(failed) > len(results):
            cause = collections.Counter(_describe(results[i]) for i in failed).most_common(1)[0][0]
            hint = (
                ""
                if self.config.mp_context == "fork"
                else f"; with mp_context={self.config.mp_context!r} every worker re-imports the main "
                "module, so a script that grades must guard its entry point with "
                '`if __name__ == "__main__":`'
            )
            raise GradingError(
                f"math grading failed for {len(failed)} of {len(results)} answers even after "
                f"restarting the grading pool ({cause}): the grading workers die or cannot start. "
                f"Check whether the OS kills them (out of memory){hint}"
            )
        return [GradeResult(correct=False, error=_describe(r)) if isinstance(r, BaseException) else r for r in results]

    def close(self):
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join()
                self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe(error: BaseException) -> str:
    code = getattr(error, "exitcode", None)
    return (f"{type(error).__name__}: {error}" + (f" (exit code {code})" if code is not None else ""))[:500]


_SHARED: dict[GradingConfig, MathGrader] = {}


def get_grader(config: GradingConfig = GradingConfig()) -> MathGrader:
    """A process-wide grader per config (its pool is reused across calls, closed at exit)."""
    if config not in _SHARED:
        _SHARED[config] = MathGrader(config)
    return _SHARED[config]


@atexit.register
def _close_shared():
    for g in _SHARED.values():
        g.close()


def grade_batch(
    predictions: Sequence[str], golds: Sequence[str], timeout: float = 10.0, workers: int = 1, in_process: bool = False
) -> list[GradeResult]:
    """Grade a batch with the shared pool for (timeout, workers). See `MathGrader.grade_batch`."""
    cfg = GradingConfig(timeout_s=timeout, workers=workers, in_process=in_process)
    return get_grader(cfg).grade_batch(predictions, golds)


def grading_metrics(results: Sequence[GradeResult]) -> dict[str, float]:
    """Counts for logging: accuracy, number of timeouts and of errors."""
    n = max(len(results), 1)
    return {
        "accuracy": sum(r.correct for r in results) / n,
        "grade_timeouts": float(sum(r.timed_out for r in results)),
        "grade_errors": float(sum(r.error is not None and not r.timed_out for r in results)),
    }
