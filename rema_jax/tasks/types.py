"""The `Task` record: one question with its gold answer, shared by training and evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

TaskKind = Literal["math", "judge"]
JUDGE_LABELS = ("A>B", "B>A")


@dataclasses.dataclass(frozen=True)
class Task:
    """One question with an exact gold answer.

    Attributes:
      uid: unique, stable id (used for resuming evals and for train/test bookkeeping).
      question: the problem text as shown to the agents (no instruction suffix).
      answer: the gold answer as an exact string (math: LaTeX such as ``-\\frac{3}{4}``;
        judge: ``"A"`` or ``"B"``, the better response).
      kind: ``"math"`` (graded by math-verify) or ``"judge"`` (graded by the verdict).
      level: difficulty (MATH level 1-5, builtin level 1..N); None when unknown.
      subject: MATH subject / builtin family / judge source subset.
      source: where it came from (benchmark name, file, ``builtin``).
      response_a, response_b, label: judge tasks only; ``label`` is ``"A>B"`` or ``"B>A"``.
    """

    uid: str
    question: str
    answer: str
    kind: TaskKind = "math"
    level: int | None = None
    subject: str | None = None
    source: str = ""
    response_a: str | None = None
    response_b: str | None = None
    label: str | None = None

    def __post_init__(self):
        if not self.uid:
            raise ValueError("Task.uid must be non-empty")
        if not self.question or not self.question.strip():
            raise ValueError(f"Task {self.uid!r}: empty question")
        if not self.answer or not self.answer.strip():
            raise ValueError(f"Task {self.uid!r}: empty answer")
        if self.kind == "math":
            if self.response_a is not None or self.response_b is not None or self.label is not None:
                raise ValueError(f"Task {self.uid!r}: math tasks carry no response_a/response_b/label")
        elif self.kind == "judge":
            if not self.response_a or not self.response_b:
                raise ValueError(f"Task {self.uid!r}: judge tasks need non-empty response_a and response_b")
            if self.label not in JUDGE_LABELS:
                raise ValueError(f"Task {self.uid!r}: judge label must be one of {JUDGE_LABELS}, got {self.label!r}")
            if self.answer != self.label[0]:
                raise ValueError(f"Task {self.uid!r}: answer {self.answer!r} disagrees with label {self.label!r}")
        else:
            raise ValueError(f"Task {self.uid!r}: kind must be 'math' or 'judge', got {self.kind!r}")

    def swapped(self) -> "Task":
        """The judge task with responses A and B exchanged (uid gets a ``#swap`` suffix)."""
        if self.kind != "judge":
            raise ValueError(f"Task {self.uid!r}: only judge tasks can be swapped")
        label = "B>A" if self.label == "A>B" else "A>B"
        return dataclasses.replace(
            self,
            uid=self.uid + "#swap",
            response_a=self.response_b,
            response_b=self.response_a,
            label=label,
            answer=label[0],
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Task":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Task.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)


def judge_task(
    uid: str,
    question: str,
    response_a: str,
    response_b: str,
    label: str,
    *,
    subject: str | None = None,
    source: str = "",
) -> Task:
    """Builds a judge task; the gold answer is the better response's letter."""
    if label not in JUDGE_LABELS:
        raise ValueError(f"judge label must be one of {JUDGE_LABELS}, got {label!r}")
    return Task(
        uid=uid,
        question=question,
        answer=label[0],
        kind="judge",
        subject=subject,
        source=source,
        response_a=response_a,
        response_b=response_b,
        label=label,
    )
