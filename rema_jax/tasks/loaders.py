"""Benchmark file loaders: one registry, one `Task` record type, loud errors on bad records.

`load_benchmark(name, path)` reads JSONL, JSON (a list of records) or verl parquet files and turns
each record into a `Task` with the parser registered for `name`. `path` is a file, a glob or a list
of them (e.g. the seven MATH train subject files); a glob matching no file is an error. A bad record (bad JSON,
non-UTF-8 bytes, a missing field, an empty answer) raises `BadRecordError` naming ``file:line``
and the field; with ``skip_bad_records=True`` it is skipped, counted in the returned
`LoadStats` and reported with a warning. Nothing is dropped silently.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import logging
import os
import pathlib
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from rema_jax.errors import UserError
from rema_jax.tasks.types import JUDGE_LABELS, Task

log = logging.getLogger(__name__)


class BadRecordError(ValueError, UserError):
    """A record that cannot become a `Task`; `where` is ``file:line`` (or ``file:row N``)."""

    def __init__(self, where: str, field: str | None, message: str):
        self.where, self.field = where, field
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)


class _FieldError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message
        super().__init__(message)


@dataclasses.dataclass
class LoadStats:
    path: str  # the path (or pattern / list) as given
    records: int = 0  # non-blank records read
    loaded: int = 0
    skipped: int = 0
    blank_lines: int = 0
    skip_reasons: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # the files read, in order


@dataclasses.dataclass
class Benchmark:
    name: str
    tasks: list[Task]
    stats: LoadStats


# ------------------------------------------------------------------ answer helpers


def last_boxed_content(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` in `text` (braces balanced), else None."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        # "\boxed 5" form: the next whitespace-delimited token
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    depth, start = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None


def _strip_dollars(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


def _answer_str(value: Any, field: str) -> str:
    """Gold answer as a non-empty string; floats that are integers lose their ``.0``."""
    if value is None:
        raise _FieldError(field, "missing")
    if isinstance(value, bool):
        raise _FieldError(field, f"expected a string or number, got {value!r}")
    if isinstance(value, float):
        value = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string or number, got {type(value).__name__}")
    value = _strip_dollars(value)
    if not value:
        raise _FieldError(field, "empty answer")
    return value


def _text(rec: Mapping[str, Any], field: str) -> str:
    if field not in rec or rec[field] is None:
        raise _FieldError(field, "missing")
    v = rec[field]
    if not isinstance(v, str):
        raise _FieldError(field, f"expected a string, got {type(v).__name__}")
    if not v.strip():
        raise _FieldError(field, "empty")
    return v


def _first_text(rec: Mapping[str, Any], fields: tuple[str, ...]) -> str:
    for f in fields:
        if rec.get(f) is not None:
            return _text(rec, f)
    raise _FieldError(" or ".join(fields), "missing")


def _level(value: Any) -> int | None:
    """MATH levels come as 3, "3" or "Level 3"; anything else (e.g. "Level ?") is None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def _uid(rec: Mapping[str, Any], name: str, index: int, fields=("unique_id", "pair_id", "id", "idx")) -> str:
    for f in fields:
        if rec.get(f) is not None and str(rec[f]) != "":
            return f"{name}/{rec[f]}"
    return f"{name}/{index}"


def _optional_str(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v in ("", "None")) else str(v)


# ------------------------------------------------------------------ record parsers


def parse_math(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """MATH-style: ``problem`` (or ``question``) + ``answer``, else the last box of ``solution``."""
    question = _first_text(rec, ("problem", "question"))
    if rec.get("answer") is not None and str(rec["answer"]).strip():
        answer = _answer_str(rec["answer"], "answer")
    elif rec.get("solution") is not None:
        solution = rec["solution"]
        if isinstance(solution, list):
            solution = "\n".join(map(str, solution))
        boxed = last_boxed_content(str(solution))
        if boxed is None or not boxed.strip():
            raise _FieldError("solution", "no answer field and no non-empty \\boxed{} in the solution")
        answer = boxed.strip()
    elif "answer" in rec:
        raise _FieldError("answer", "empty answer (and no 'solution' to take a \\boxed{} answer from)")
    else:
        raise _FieldError("answer", "missing (and no 'solution' to take a \\boxed{} answer from)")
    return Task(
        uid=_uid(rec, name, index),
        question=question,
        answer=answer,
        level=_level(rec.get("level")),
        subject=_optional_str(rec.get("subject", rec.get("type"))),
        source=name,
    )


def parse_gsm8k(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """GSM8K: the answer is what follows ``####`` in the rationale, commas stripped."""
    question = _text(rec, "question")
    rationale = _text(rec, "answer")
    if "####" not in rationale:
        raise _FieldError("answer", "no '#### <answer>' marker in the rationale")
    answer = rationale.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise _FieldError("answer", "empty answer after '####'")
    return Task(uid=_uid(rec, name, index), question=question, answer=answer, subject="gsm8k", source=name)


def parse_olympiadbench(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """OlympiadBench: ``final_answer`` is a list (or its string form); multiple answers joined by ', '."""
    question = _text(rec, "question")
    if rec.get("context"):
        question = f"{rec['context']}\n\n{question}"
    raw = rec.get("final_answer")
    if raw is None:
        raise _FieldError("final_answer", "missing")
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raw = [raw]
    if isinstance(raw, (str, int, float)):
        raw = [raw]
    parts = [_answer_str(a, "final_answer") for a in raw]
    if not parts:
        raise _FieldError("final_answer", "empty list")
    return Task(
        uid=_uid(rec, name, index),
        question=question,
        answer=", ".join(parts),
        subject=_optional_str(rec.get("subfield")),
        source=name,
    )


def parse_verl(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """ReMA / verl parquet rows: ``question`` (else the last user prompt) + ``reward_model.ground_truth``."""
    if rec.get("question") is not None:
        question = _text(rec, "question")
    else:
        prompt = rec.get("prompt")
        users = [m.get("content") for m in (prompt or []) if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not users[-1]:
            raise _FieldError("question", "missing (and no user message in 'prompt')")
        question = users[-1]
    rm = rec.get("reward_model")
    if not isinstance(rm, Mapping):
        raise _FieldError("reward_model", "missing or not a struct with 'ground_truth'")
    answer = _answer_str(rm.get("ground_truth"), "reward_model.ground_truth")
    source = _optional_str(rec.get("subset")) or _optional_str(rec.get("data_source")) or name
    # Row ids repeat across subsets of one file, so key by the subset. aime25 rows have no idx
    # and their extra_info.index repeats (two exams), so those fall back to the row number.
    if rec.get("unique_id"):
        uid = f"{source}/{rec['unique_id']}"
    elif rec.get("idx") is not None:
        uid = f"{source}/{rec['idx']}"
    else:
        uid = f"{source}/row-{index}"
    return Task(
        uid=uid,
        question=question,
        answer=answer,
        level=_level(rec.get("level")),
        subject=_optional_str(rec.get("subject", rec.get("type"))),
        source=source,
    )


def parse_rema_overall_jsonl(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """ReMA's raw 7-benchmark JSONL: ``question`` + ``answer``; ``dataset`` names the benchmark."""
    task = parse_math(rec, name, index)
    dataset = _optional_str(rec.get("dataset")) or name
    return dataclasses.replace(task, uid=f"{dataset}/{rec.get('idx', index)}", source=dataset)


def parse_judge(rec: Mapping[str, Any], name: str, index: int) -> Task:
    """Pair files: ``question``, ``response_A``, ``response_B``, ``label`` in {"A>B", "B>A"}.

    RewardBench's raw layout (``prompt``, ``chosen``, ``rejected``) is accepted too, with the
    chosen response as A.
    """
    if "chosen" in rec and "response_A" not in rec:
        question = _first_text(rec, ("prompt", "question"))
        a, b, label = _text(rec, "chosen"), _text(rec, "rejected"), "A>B"
    else:
        question = _text(rec, "question")
        a, b = _text(rec, "response_A"), _text(rec, "response_B")
        label = rec.get("label")
        if label not in JUDGE_LABELS:
            raise _FieldError("label", f"expected one of {JUDGE_LABELS}, got {label!r}")
    subject = _optional_str(rec.get("source", rec.get("subset")))
    return Task(
        uid=_uid(rec, name, index),
        question=question,
        answer=label[0],
        kind="judge",
        subject=subject,
        source=name,
        response_a=a,
        response_b=b,
        label=label,
    )


RecordParser = Callable[[Mapping[str, Any], str, int], Task]

BENCHMARKS: dict[str, RecordParser] = {
    "math": parse_math,
    "math500": parse_math,
    "math_train": parse_math,
    "aime24": parse_math,
    "aime25": parse_math,
    "amc23": parse_math,
    "minerva_math": parse_math,
    "gaokao2023en": parse_math,
    "gsm8k": parse_gsm8k,
    "olympiadbench": parse_olympiadbench,
    "verl": parse_verl,
    "rema_parquet": parse_verl,
    "rema_overall_jsonl": parse_rema_overall_jsonl,
    "judgebench": parse_judge,
    "rewardbench": parse_judge,
}


def register_benchmark(name: str, parser: RecordParser) -> None:
    """Adds a record parser for a new benchmark layout."""
    if name in BENCHMARKS:
        raise ValueError(f"benchmark {name!r} is already registered")
    BENCHMARKS[name] = parser


# ------------------------------------------------------------------ file readers


def _iter_jsonl(path: pathlib.Path, stats: LoadStats) -> Iterator[tuple[str, int, Any]]:
    """Yields (where, index, record-or-exception) per non-blank line; decode errors are yielded."""
    with open(path, "rb") as f:
        index = 0
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, index, _FieldError(None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                index += 1
                continue
            if not line.strip():
                stats.blank_lines += 1
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, index, _FieldError(None, f"bad JSON ({e.msg} at column {e.colno})")
            else:
                yield (
                    where,
                    index,
                    rec
                    if isinstance(rec, dict)
                    else _FieldError(None, f"expected a JSON object, got {type(rec).__name__}"),
                )
            index += 1


def _iter_json_list(path: pathlib.Path) -> Iterator[tuple[str, int, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecordError(str(path), None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{path}:{e.lineno}", None, f"bad JSON ({e.msg})") from e
    if not isinstance(data, list):
        raise BadRecordError(str(path), None, "a .json benchmark file must hold a list of records")
    for i, rec in enumerate(data):
        yield (
            f"{path}:record {i}",
            i,
            rec if isinstance(rec, dict) else _FieldError(None, f"expected a JSON object, got {type(rec).__name__}"),
        )


def _iter_parquet(path: pathlib.Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    table = pq.read_table(path)
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", i, rec


PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def has_glob(path: str | os.PathLike) -> bool:
    """Whether `path` is a glob pattern (contains ``*``, ``?`` or ``[``)."""
    return any(c in os.fspath(path) for c in "*?[")


def resolve_paths(paths: PathSpec) -> list[pathlib.Path]:
    """A file, a glob or a list of them → the files in order (each glob's matches sorted, ``**``
    recursive). Plain paths are returned unchecked. Raises ValueError for an empty list or a file
    listed twice, and FileNotFoundError, naming the pattern, for a glob that matches no file."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no files given (an empty list of paths)")
    files = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected a path or glob, got {item!r} ({type(item).__name__})")
        if has_glob(item):
            matches = [m for m in sorted(glob.glob(os.fspath(item), recursive=True)) if os.path.isfile(m)]
            if not matches:
                where = "" if os.path.isabs(item) else f" (relative to {os.getcwd()})"
                raise FileNotFoundError(f"the glob {os.fspath(item)!r} matched no files{where}")
            files.extend(map(pathlib.Path, matches))
        else:
            files.append(pathlib.Path(item))
    seen = set()
    for f in files:
        if os.path.abspath(f) in seen:
            raise ValueError(f"{f} is listed more than once")
        seen.add(os.path.abspath(f))
    return files


def load_benchmark(name: str, path: PathSpec, *, skip_bad_records: bool = False, limit: int | None = None) -> Benchmark:
    """Loads benchmark `name` (a key of `BENCHMARKS`) from .jsonl, .json or .parquet files.

    Args:
      name: the record layout; also the tasks' ``source`` and uid prefix.
      path: a file, a glob (``dir/*.jsonl``) or a list of them, read in order (see `resolve_paths`).
        The record index (the uid fallback for records without an id) runs on across files, and
        uids must be unique over all of them.
      skip_bad_records: skip (count, warn about) bad records instead of raising.
      limit: keep only the first `limit` good tasks (for quick evals).
    Raises:
      FileNotFoundError (a missing file, a glob matching none), ValueError (unknown name /
      extension, no files), BadRecordError.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(BENCHMARKS)}")
    try:
        files = resolve_paths(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"benchmark {name!r}: {e}") from None
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"benchmark {name!r}: no file at {f}")
        suffix = f.suffix.lower()
        if suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{f}: unsupported extension {suffix!r} (expected .jsonl, .json or .parquet)")
    parser = BENCHMARKS[name]
    shown_path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str([os.fspath(p) for p in path])
    stats = LoadStats(path=shown_path, files=[str(f) for f in files])

    def records() -> Iterator[tuple[str, int, Any]]:
        index = 0  # runs on across files, so fallback uids stay distinct
        for f in files:
            suffix = f.suffix.lower()
            it = (
                _iter_jsonl(f, stats)
                if suffix == ".jsonl"
                else _iter_json_list(f)
                if suffix == ".json"
                else _iter_parquet(f)
            )
            for where, _, rec in it:
                yield where, index, rec
                index += 1

    tasks: list[Task] = []
    seen_uids: dict[str, str] = {}
    for where, index, rec in records():
        if limit is not None and len(tasks) >= limit:
            break
        stats.records += 1
        try:
            if isinstance(rec, _FieldError):
                raise rec
            task = parser(rec, name, index)
            if task.uid in seen_uids:
                raise _FieldError("id", f"duplicate uid {task.uid!r} (first at {seen_uids[task.uid]})")
        except (_FieldError, ValueError) as e:
            field = e.field if isinstance(e, _FieldError) else None
            err = BadRecordError(where, field, e.message if isinstance(e, _FieldError) else str(e))
            if not skip_bad_records:
                raise err from None
            stats.skipped += 1
            stats.skip_reasons.append(str(err))
            continue
        seen_uids[task.uid] = where
        tasks.append(task)
    stats.loaded = len(tasks)
    if stats.skipped:
        shown = "; ".join(stats.skip_reasons[:3])
        msg = (
            f"{stats.path}: skipped {stats.skipped} of {stats.records} bad records ({shown}"
            f"{'; ...' if stats.skipped > 3 else ''})"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return Benchmark(name=name, tasks=tasks, stats=stats)
