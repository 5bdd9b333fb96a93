"""Benchmark file loaders: one registry, one `Task` record type, loud errors on bad records.

`load_benchmark(name, path)` reads JSONL, JSON (a list of records) or verl parquet files and turns
each record into a `Task` with the parser registered for `name`. `path` is a file, a glob or a list
of them (e.g. the seven MATH train subject files); a glob matching no file is an error. A bad record (bad JSON,
non-UTF-8 bytes, a missing field, an empty answer) raises `BadRecordError` naming ``file:line``
and the field; with ``skip_bad_records=True`` it is skipped, counted in the returned
`LoadStats` and reported with a warning. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Iterator, Sequence, Union

from rema_jax.errors import UserError
from rema_jax.tasks.parsers import (  # noqa: F401  (re-exported: the parsers and their registry)
    BENCHMARKS,
    RecordParser,
    _FieldError,
    last_boxed_content,
    parse_gsm8k,
    parse_judge,
    parse_math,
    parse_olympiadbench,
    parse_rema_overall_jsonl,
    parse_verl,
    register_benchmark,
)
from rema_jax.tasks.types import Task

log = logging.getLogger(__name__)


class BadRecordError(ValueError, UserError):
    """A record that cannot become a `Task`; `where` is ``file:line`` (or ``file:row N``)."""

    def __init__(self, where: str, field: str | None, message: str):
        self.where, self.field = where, field
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)


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
