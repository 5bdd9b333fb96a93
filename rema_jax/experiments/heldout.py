"""Reading held-out evaluations (one JSONL record per question: ``uid``, ``subject``, ``level``,
``correct``), shared by the bootstrap job and the powered experiment: accuracy per family, a checked
record count, and per-question 0/1 vectors in one fixed question order."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from rema_jax.experiments.records import StageError


def heldout_scores(path: str) -> dict[str, Any]:
    """Accuracy (fraction) overall and per task family from an eval JSONL (one record per question)."""
    by = collections.defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by[r["subject"]].append(bool(r["correct"]))
    allv = [c for v in by.values() for c in v]
    return {
        "accuracy": sum(allv) / max(len(allv), 1),
        "questions": len(allv),
        "by_family": {fam: sum(v) / len(v) for fam, v in sorted(by.items())},
    }


def check_eval_file(path: str, questions: int) -> None:
    """A finished stage's eval file exists and holds ``questions`` records (else the stage failed)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"held-out evaluation {path} was not written")
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    if n != questions:
        raise StageError(f"{path}: {n} held-out records, expected {questions}")


def read_eval(path: str) -> dict[str, dict[str, Any]]:
    """uid → record, each checked for ``uid``, ``subject`` and ``correct`` (blank lines skipped)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            for key in ("uid", "subject", "correct"):
                if key not in r:
                    raise StageError(f"{path}:{i}: eval record without {key!r}")
            out[r["uid"]] = r
    return out


class Questions:
    """The held-out questions in one fixed order (the first SFT evaluation's), with family / level."""

    def __init__(self, path: str):
        recs = read_eval(path)
        self.uids = list(recs)
        self.family = np.array([recs[u]["subject"] for u in self.uids])
        self.level = np.array([recs[u].get("level") for u in self.uids])

    def vector(self, path: str) -> np.ndarray:
        recs = read_eval(path)
        if set(recs) != set(self.uids):
            missing = sorted(set(self.uids) - set(recs))[:3]
            extra = sorted(set(recs) - set(self.uids))[:3]
            raise StageError(f"{path}: not the report's held-out questions (missing {missing}, extra {extra})")
        return np.array([float(bool(recs[u]["correct"])) for u in self.uids])
