"""Metrics sinks: JSONL (one record per step) and TensorBoard event files.

Only process 0 writes (multi-host runs call ``jax.process_index()``). JSONL is the source of
truth for plots and for checking that a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(value: Any) -> float | int | str | None:
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {arr.shape}")
    v = arr.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (math.inf if v > 0 else -math.inf)
    return v


class MetricsLogger:
    """Append step metrics to ``<workdir>/metrics.jsonl`` and TensorBoard under ``<workdir>/tb``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_from_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_from_step is not None and os.path.exists(self.path):
            # Drop records past the checkpoint we resume from, so the log matches an uninterrupted run.
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_from_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
