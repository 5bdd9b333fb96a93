"""SFT conversations: the official two-role files (LLaMA-Factory alpaca) and built-in worked examples.

A ``Conversation`` is one agent's chat: ``system``, then alternating ``user`` / ``assistant``
messages, ending on an ``assistant`` message. The loss is on that agent's assistant messages
(all of them, as LLaMA-Factory trains every turn of ``history`` by default).

Alpaca layout (one JSON object per line, one file per role): ``system``; ``history`` = a list of
``[user, assistant]`` pairs; then the final ``user = instruction`` (+ ``"\\n" + input`` when
``input`` is non-empty, LLaMA-Factory's join) and ``assistant = output``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

from rema_jax.rollout import prompts as prompts_lib
from rema_jax.rollout.prompts import META_THINKING, REASONING, SINGLE
from rema_jax.sft.worked import worked_example
from rema_jax.tasks.loaders import BadRecordError
from rema_jax.tasks.types import Task

SFT_ROLES = (META_THINKING, REASONING, SINGLE)
BUILTIN_MODES = ("single_turn", "vrp")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One agent's chat. ``messages``: ``(chat_role, text)`` with chat_role system/user/assistant."""

    role: str
    messages: tuple[tuple[str, str], ...]
    source: str

    def __post_init__(self):
        if self.role not in SFT_ROLES:
            raise ValueError(f"{self.source}: role must be one of {SFT_ROLES}, got {self.role!r}")
        if not self.messages or self.messages[-1][0] != "assistant":
            raise ValueError(f"{self.source}: a conversation must end on an assistant message")
        body = self.messages[1:] if self.messages[0][0] == "system" else self.messages
        for i, (who, _) in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if who != expected:
                raise ValueError(
                    f"{self.source}: message {i} is {who!r}, expected {expected!r} "
                    "(user and assistant must alternate after the system prompt)"
                )


def _text(record: dict, field: str, where: str, *, optional: bool = False) -> str:
    value = record.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadRecordError(where, field, f"expected a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise BadRecordError(where, field, "is empty")
    return value


def parse_alpaca_record(record: object, role: str, where: str) -> Conversation:
    """One alpaca record → ``Conversation`` (``BadRecordError`` names ``where`` and the field)."""
    if not isinstance(record, dict):
        raise BadRecordError(where, None, f"expected a JSON object, got {type(record).__name__}")
    system = _text(record, "system", where, optional=True)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecordError(
            where, "history", f"expected a list of [user, assistant] pairs, got {type(history).__name__}"
        )
    messages: list[tuple[str, str]] = [("system", system)] if system else []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise BadRecordError(
                where, f"history[{i}]", f"expected a [user, assistant] pair of strings, got {pair!r:.80}"
            )
        if not pair[1].strip():
            raise BadRecordError(where, f"history[{i}][1]", "assistant message is empty")
        messages += [("user", pair[0]), ("assistant", pair[1])]
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, optional=True)
    messages += [("user", instruction + ("\n" + extra if extra else "")), ("assistant", _text(record, "output", where))]
    return Conversation(role=role, messages=tuple(messages), source=where)


def load_alpaca_file(
    path: str, role: str, *, system_prompt: str | None = None, limit: int | None = None
) -> list[Conversation]:
    """All conversations of a ``.jsonl`` (or ``.json`` list) alpaca file for ``role``.

    ``system_prompt`` replaces every record's system prompt (e.g. the RL prompt: the official SFT
    data use a slightly different MTA system prompt than the RL rollout, spec §5.2).
    """
    if role not in SFT_ROLES:
        raise ValueError(f"role must be one of {SFT_ROLES}, got {role!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: SFT conversation file not found")
    name = os.path.basename(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise BadRecordError(f"{name}:{e.lineno}", None, f"invalid JSON: {e.msg}") from None
        if not isinstance(rows, list):
            raise BadRecordError(name, None, "a .json SFT file must hold a list of records")
        items: Iterable = ((f"{name}:record {i}", r) for i, r in enumerate(rows))
    else:

        def lines():
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{name}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRecordError(f"{name}:{lineno}", None, f"invalid JSON: {e.msg}") from None

        items = lines()
    out = []
    for where, record in items:
        conv = parse_alpaca_record(record, role, where)
        if system_prompt is not None:
            body = conv.messages[1:] if conv.messages[0][0] == "system" else conv.messages
            conv = dataclasses.replace(conv, messages=(("system", system_prompt),) + tuple(body))
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise BadRecordError(name, None, "the file holds no records")
    return out


def builtin_conversations(
    tasks: Sequence[Task], *, mode: str = "single_turn", prompt_variant: str | None = None
) -> dict[str, list[Conversation]]:
    """Worked examples as chats, with the rollout's own prompts for ``mode``.

    ``single_turn`` (MAMRP): MTA ``[system, user=question, assistant=plan]``; RA ``[system,
    user=template(question, plan), assistant=solution ending in \\boxed{}]``.
    ``vrp`` (the single-agent baseline): ``[system, user=question, assistant=solution]``, the same
    solutions, so a VRP_RL run can be warm-started on the same data as ReMA.
    Returns ``{role: conversations}`` in task order.
    """
    if mode not in BUILTIN_MODES:
        raise ValueError(f"builtin worked examples: mode must be one of {BUILTIN_MODES}, got {mode!r}")
    prompt_set = prompts_lib.get_prompts(mode, prompt_variant)
    if mode == "vrp":
        single = prompt_set[SINGLE]
        return {
            SINGLE: [
                Conversation(
                    SINGLE,
                    (
                        ("system", single.system),
                        ("user", single.user({"question": t.question})),
                        ("assistant", worked_example(t).solution),
                    ),
                    source=f"{t.uid}#solution",
                )
                for t in tasks
            ]
        }
    mta, ra = prompt_set[META_THINKING], prompt_set[REASONING]
    out: dict[str, list[Conversation]] = {META_THINKING: [], REASONING: []}
    for task in tasks:
        ex = worked_example(task)
        q = {"question": task.question}
        out[META_THINKING].append(
            Conversation(
                META_THINKING,
                (("system", mta.system), ("user", mta.user(q)), ("assistant", ex.plan)),
                source=f"{task.uid}#plan",
            )
        )
        out[REASONING].append(
            Conversation(
                REASONING,
                (("system", ra.system), ("user", ra.user(q, ex.plan)), ("assistant", ex.solution)),
                source=f"{task.uid}#solution",
            )
        )
    return out
