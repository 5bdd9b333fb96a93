"""Record parsers: one function per benchmark layout turns a raw record into a `Task`, and the
registry `load_benchmark` (tasks/loaders.py) picks them from. A parser raises `_FieldError` naming the
field; the loader adds ``file:line``."""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable, Mapping

from rema_jax.tasks.types import JUDGE_LABELS, Task


class _FieldError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message
        super().__init__(message)


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
