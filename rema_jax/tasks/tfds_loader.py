"""TFDS datasets as `Task`s, read through the TensorFlow-free ``array_record`` data source.

Only datasets already prepared under `data_dir` are read: this module never downloads or
prepares anything, so an offline machine fails fast with a message saying what to do.
Reading needs no TensorFlow when the dataset was prepared with ``file_format="array_record"``
(`builder.as_data_source`); ``tfrecord`` datasets need TensorFlow and are refused with that reason.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping

from rema_jax.errors import UserError
from rema_jax.tasks.types import Task


class TFDSUnavailableError(RuntimeError, UserError):
    """The requested TFDS dataset cannot be read here (not prepared, wrong format, unknown)."""


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        return _decode(v.item())
    return v


def tfds_builder(name: str, data_dir: str | pathlib.Path):
    """The prepared builder for `name` (``"ds"`` or ``"ds/config:1.0.0"``) in `data_dir`.

    Raises:
      TFDSUnavailableError: `data_dir` missing, dataset unknown, or not prepared there.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise TFDSUnavailableError(
            f"TFDS data_dir {data_dir} does not exist; prepare {name!r} there first (this loader never downloads)"
        )
    try:
        # try_gcs=False: never reach for the network; an unregistered name is looked up in data_dir.
        builder = tfds.builder(name, data_dir=str(data_dir), try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).splitlines()[0]
        raise TFDSUnavailableError(
            f"TFDS dataset {name!r}: {first_line} (neither registered nor prepared under {data_dir})"
        ) from None
    if not builder.is_prepared():
        raise TFDSUnavailableError(
            f"TFDS dataset {name!r} is not prepared under {data_dir} (expected {builder.data_dir}); run "
            "builder.download_and_prepare(file_format='array_record') where the source data is "
            "reachable, then copy the directory here"
        )
    return builder


def load_tfds(
    name: str,
    data_dir: str | pathlib.Path,
    split: str,
    *,
    question_key: str = "question",
    answer_key: str = "answer",
    answer_fn: Callable[[Mapping[str, Any]], str] | None = None,
    limit: int | None = None,
) -> list[Task]:
    """Reads split `split` of a prepared TFDS dataset into math `Task`s.

    Args:
      name, data_dir: see `tfds_builder`.
      split: a TFDS split name (e.g. ``"test"``).
      question_key, answer_key: feature names holding the question and the gold answer.
      answer_fn: optional ``example -> answer`` (e.g. to cut a GSM8K ``####`` rationale).
      limit: read only the first `limit` examples.
    Raises:
      TFDSUnavailableError, ValueError (a record lacks a field or has an empty answer).
    """
    builder = tfds_builder(name, data_dir)
    if split not in builder.info.splits:
        raise TFDSUnavailableError(
            f"TFDS dataset {name!r} has no split {split!r}; available: {sorted(builder.info.splits)}"
        )
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise TFDSUnavailableError(
            f"TFDS dataset {name!r} is stored as {file_format!r}; reading it needs TensorFlow. "
            "Re-prepare it with file_format='array_record' for the TensorFlow-free data source"
        )
    source = builder.as_data_source(split=split)
    n = len(source) if limit is None else min(limit, len(source))
    tasks = []
    for i in range(n):
        ex = {k: _decode(v) for k, v in source[i].items()}
        where = f"tfds:{name}/{split}[{i}]"
        for key in (question_key,) + (() if answer_fn else (answer_key,)):
            if key not in ex:
                raise ValueError(f"{where}: field {key!r} missing; features are {sorted(ex)}")
        answer = answer_fn(ex) if answer_fn else str(ex[answer_key])
        if not str(answer).strip() or not str(ex[question_key]).strip():
            raise ValueError(f"{where}: empty {'answer' if not str(answer).strip() else question_key!r}")
        tasks.append(
            Task(
                uid=f"{builder.name}/{split}/{i}",
                question=str(ex[question_key]),
                answer=str(answer).strip(),
                source=f"tfds:{builder.name}",
            )
        )
    return tasks
