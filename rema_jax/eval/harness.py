"""The evaluation loop: solve in batches, grade, write resumable per-sample JSONL, summarise.

A *solver* is ``solve_fn(tasks) -> list[dict]``, one dict per task in order, with at least
``final_answer`` (the text graded) and ``messages`` (both agents' messages, ``[{"role", "content"}]``);
other keys (e.g. ``finish_reason``) are kept under ``solver`` in the sample record. The real
solvers come from `rema_jax.eval.solvers` (rollouts through the jitted sampler); tests pass fakes.

Outputs under ``workdir``: ``samples/<mode>/<benchmark>.jsonl`` (one record per sample, appended
and flushed per batch, so an interrupted eval resumes by skipping the (uid, sample) keys already
there), ``summary.json`` and ``table.md`` (paper Table 1 layout).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tqdm

from rema_jax.eval import metrics as metrics_lib
from rema_jax.eval.table import markdown_table
from rema_jax.tasks.types import Task

log = logging.getLogger(__name__)

SolveFn = Callable[[Sequence[Task]], list[dict]]
GradeFn = Callable[[list[str], list[str]], list[Any]]  # -> objects with correct/extracted/timed_out/error
VerdictFn = Callable[[str], "str | None"]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How to evaluate.

    Attributes:
      batch_size: tasks per solver call (the sampler buckets the batch).
      num_samples: samples per task; 1 with a greedy solver gives the paper's pass@1.
      ks: k values for pass@k and maj@k (those <= num_samples are reported).
      judge_both_orders: also evaluate every judge pair with A/B swapped; report accuracy where
        both orders must agree (``accuracy_both_orders``), which the table then uses.
      grade_timeout: per-sample math-verify timeout in seconds.
      progress: show a tqdm bar.
    """

    batch_size: int = 16
    num_samples: int = 1
    ks: tuple[int, ...] = (1,)
    judge_both_orders: bool = False
    grade_timeout: float = 10.0
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError(
                f"EvalSettings: batch_size and num_samples must be >= 1, got {self.batch_size}, {self.num_samples}"
            )
        if any(k < 1 for k in self.ks):
            raise ValueError(f"EvalSettings.ks must be >= 1, got {self.ks}")


def default_grade_fn(timeout: float) -> GradeFn:
    from rema_jax.rewards import math_grading  # pylint: disable=g-import-not-at-top

    return lambda preds, golds: math_grading.grade_batch(preds, golds, timeout=timeout)


def default_boxed_fn() -> Callable[[str], "str | None"]:
    from rema_jax.rewards import math_grading  # pylint: disable=g-import-not-at-top

    return math_grading.strict_boxed_answer


def default_verdict_fn() -> VerdictFn:
    try:
        from rema_jax.rewards.shaping import parse_verdict  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise RuntimeError(
            "judge tasks are graded with rema_jax.rewards.shaping.parse_verdict, which "
            f"is not importable ({e}); pass verdict_fn explicitly"
        ) from None
    return parse_verdict


# ------------------------------------------------------------------ JSONL with resume


def read_samples(path: pathlib.Path) -> list[dict]:
    """Records of a sample JSONL. A torn last line (interrupted write) is cut off with a warning;
    a bad line elsewhere is an error naming ``file:line``."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1 or all(not l.strip() for l in lines[i + 1 :]):
                log.warning("%s:%d: dropping a torn last record (interrupted write); it will be redone", path, i + 1)
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise ValueError(f"{path}:{i + 1}: corrupt sample record ({e}); delete the line to resume") from e
        good_bytes += len(line) + 1
    return records


def _sample_key(rec: Mapping[str, Any]) -> tuple[str, int]:
    return rec["uid"], int(rec["sample"])


# ------------------------------------------------------------------ grading


def _grade(
    tasks: Sequence[Task],
    outputs: Sequence[dict],
    grade_fn: GradeFn | None,
    verdict_fn: VerdictFn | None,
    boxed_fn,
    timeout: float,
) -> list[dict]:
    """Per sample: extracted, correct, boxed, timed_out, error."""
    results: list[dict | None] = [None] * len(tasks)
    math_idx = [i for i, t in enumerate(tasks) if t.kind == "math"]
    if math_idx:
        grade_fn = grade_fn or default_grade_fn(timeout)
        boxed_fn = boxed_fn or default_boxed_fn()
        preds = [outputs[i]["final_answer"] for i in math_idx]
        graded = grade_fn(preds, [tasks[i].answer for i in math_idx])
        if len(graded) != len(math_idx):
            raise ValueError(f"grade_fn returned {len(graded)} results for {len(math_idx)} predictions")
        for i, g, p in zip(math_idx, graded, preds):
            results[i] = {
                "extracted": g.extracted,
                "correct": bool(g.correct),
                "boxed": boxed_fn(p),
                "timed_out": bool(g.timed_out),
                "error": g.error,
            }
    judge_idx = [i for i, t in enumerate(tasks) if t.kind == "judge"]
    if judge_idx:
        verdict_fn = verdict_fn or default_verdict_fn()
        for i in judge_idx:
            v = verdict_fn(outputs[i]["final_answer"])
            results[i] = {
                "extracted": v,
                "correct": v == tasks[i].answer,
                "boxed": None,
                "timed_out": False,
                "error": None,
            }
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------ summaries


def summarize(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = (1,)) -> dict[str, Any]:
    """Metrics of one (mode, benchmark) from its sample records (percentages in [0, 100])."""
    if not records:
        raise ValueError("summarize: no records")
    by_uid: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for r in records:
        by_uid[r["uid"]].append(r)
    for recs in by_uid.values():
        recs.sort(key=lambda r: r["sample"])
    n_min = min(len(v) for v in by_uid.values())
    kind = records[0]["kind"]
    out: dict[str, Any] = {"kind": kind, "num_samples": n_min, "num_records": len(records)}
    if kind == "judge":
        orig = {u: v for u, v in by_uid.items() if not u.endswith("#swap")}
        out["num_tasks"] = len(orig)
        out["accuracy"] = 100.0 * float(np.mean([r["correct"] for v in orig.values() for r in v]))
        swapped = {u[: -len("#swap")]: v for u, v in by_uid.items() if u.endswith("#swap")}
        if swapped:
            both = [
                all(r["correct"] for r in v) and all(r["correct"] for r in swapped.get(u, [{"correct": False}]))
                for u, v in orig.items()
            ]
            out["accuracy_both_orders"] = 100.0 * float(np.mean(both))
        out["no_verdict_rate"] = 100.0 * float(np.mean([r["extracted"] is None for r in records]))
        out["score"] = out.get("accuracy_both_orders", out["accuracy"])
        return out
    correct = [[bool(r["correct"]) for r in v] for v in by_uid.values()]
    out["num_tasks"] = len(by_uid)
    out["pass@1"] = 100.0 * float(np.mean([np.mean(c) for c in correct]))
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = 100.0 * metrics_lib.mean_pass_at_k([c[:n_min] for c in correct], k)
            out[f"maj@{k}"] = 100.0 * float(
                np.mean(
                    [
                        metrics_lib.maj_at_k([r["extracted"] for r in v], [r["correct"] for r in v], k)
                        for v in by_uid.values()
                    ]
                )
            )
    out["boxed_rate"] = 100.0 * float(np.mean([r.get("boxed") is not None for r in records]))
    out["grade_timeouts"] = int(sum(bool(r.get("timed_out")) for r in records))
    out["grade_errors"] = int(sum(r.get("error") is not None and not r.get("timed_out") for r in records))
    levels: dict[str, list[float]] = collections.defaultdict(list)
    for r in records:
        if r.get("level") is not None:
            levels[str(r["level"])].append(float(r["correct"]))
    if levels:
        out["pass@1_by_level"] = {k: 100.0 * float(np.mean(v)) for k, v in sorted(levels.items())}
    out["score"] = out["pass@1"]
    return out


# ------------------------------------------------------------------ the loop


def evaluate_benchmark(
    tasks: Sequence[Task],
    solve_fn: SolveFn,
    *,
    benchmark: str,
    mode: str,
    settings: EvalSettings = EvalSettings(),
    samples_path: str | os.PathLike | None = None,
    grade_fn: GradeFn | None = None,
    verdict_fn: VerdictFn | None = None,
    boxed_fn: Callable[[str], "str | None"] | None = None,
) -> dict[str, Any]:
    """Evaluates `tasks` with `solve_fn`; returns `summarize` of all records (old and new).

    With `samples_path`, records are appended there (flushed per batch) and (uid, sample) keys
    already present are skipped. Without it, nothing is written (e.g. in-training evals).
    """
    if not tasks:
        raise ValueError(f"{benchmark}: no tasks to evaluate")
    uids = [t.uid for t in tasks]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise ValueError(f"{benchmark}: duplicate task uid {dup!r}")
    work = list(tasks)
    if settings.judge_both_orders:
        work += [t.swapped() for t in tasks if t.kind == "judge"]
    path = pathlib.Path(samples_path) if samples_path is not None else None
    done = read_samples(path) if path is not None else []
    wanted = {(t.uid, s) for t in work for s in range(settings.num_samples)}
    done = [r for r in done if _sample_key(r) in wanted]
    done_keys = {_sample_key(r) for r in done}
    pending = [(t, s) for t in work for s in range(settings.num_samples) if (t.uid, s) not in done_keys]
    if done:
        log.info("%s/%s: resuming, %d samples done, %d to go", mode, benchmark, len(done), len(pending))
    records = list(done)
    sink = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = open(path, "a", encoding="utf-8")
    try:
        bar = tqdm.tqdm(total=len(pending), desc=f"{mode}/{benchmark}", disable=not settings.progress, unit="sample")
        for start in range(0, len(pending), settings.batch_size):
            chunk = pending[start : start + settings.batch_size]
            batch = [t for t, _ in chunk]
            outputs = solve_fn(batch)
            if len(outputs) != len(batch):
                raise ValueError(f"solve_fn returned {len(outputs)} outputs for {len(batch)} tasks")
            for o in outputs:
                if "final_answer" not in o or "messages" not in o:
                    raise ValueError(f"solve_fn outputs need 'final_answer' and 'messages'; got keys {sorted(o)}")
            grades = _grade(batch, outputs, grade_fn, verdict_fn, boxed_fn, settings.grade_timeout)
            for (task, s), o, g in zip(chunk, outputs, grades):
                rec = {
                    "uid": task.uid,
                    "sample": s,
                    "benchmark": benchmark,
                    "mode": mode,
                    "kind": task.kind,
                    "level": task.level,
                    "subject": task.subject,
                    "question": task.question,
                    "gold": task.answer,
                    "final_answer": o["final_answer"],
                    "messages": o["messages"],
                    **g,
                }
                extra = {k: v for k, v in o.items() if k not in ("final_answer", "messages")}
                if extra:
                    rec["solver"] = extra
                records.append(rec)
                if sink is not None:
                    sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
            bar.update(len(chunk))
        bar.close()
    finally:
        if sink is not None:
            sink.close()
    return summarize(records, settings.ks)


def run_evaluation(
    benchmarks: Mapping[str, Sequence[Task]],
    solvers: Mapping[str, SolveFn],
    workdir: str | os.PathLike,
    *,
    settings: EvalSettings = EvalSettings(),
    grade_fn: GradeFn | None = None,
    verdict_fn: VerdictFn | None = None,
    boxed_fn: Callable[[str], "str | None"] | None = None,
) -> dict[str, Any]:
    """Every solver (mode / checkpoint) on every benchmark; writes samples, summary.json, table.md.

    Returns ``{"results": {mode: {benchmark: metrics}}, "settings": ..., "table": markdown,
    "wall_seconds": ...}`` (seconds of this call; resumed samples cost nothing).
    """
    workdir = pathlib.Path(workdir)
    start = time.time()
    results: dict[str, dict[str, Any]] = {}
    for mode, solve_fn in solvers.items():
        results[mode] = {}
        for name, tasks in benchmarks.items():
            results[mode][name] = evaluate_benchmark(
                tasks,
                solve_fn,
                benchmark=name,
                mode=mode,
                settings=settings,
                samples_path=workdir / "samples" / _safe(mode) / f"{_safe(name)}.jsonl",
                grade_fn=grade_fn,
                verdict_fn=verdict_fn,
                boxed_fn=boxed_fn,
            )
    table = markdown_table(
        {m: {b: r["score"] for b, r in res.items()} for m, res in results.items()},
        columns=list(solvers),
        benchmarks=list(benchmarks),
    )
    summary = {
        "results": results,
        "settings": dataclasses.asdict(settings),
        "table": table,
        "wall_seconds": time.time() - start,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    _atomic_write(workdir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    _atomic_write(workdir / "table.md", table)
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
