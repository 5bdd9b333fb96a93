"""Reward shaping: map grading outcomes (plain bools / strings) to per-role scalar rewards.

Spec references are to /work/shared/reference/rema-spec.md §4. Every function is pure and
takes plain Python values, never rollout objects, so the trainer decides what to pass.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional, Sequence

from rema_jax.rewards.math_grading import has_boxed, strict_boxed_answer

# Trajectory finish reason that means "ended normally through [FINISH]" (or a single-turn run).
FINISHED = "finished"

REWARD_KINDS = ("paper", "consistency", "multi_turn", "judge")
FORMAT_CHECKS = ("boxed", "nonempty_boxed")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which reward the trainer uses and its constants (defaults: paper App. C.2).

    kind: "paper" (single-turn shaped), "consistency" (ablation), "multi_turn" (official code's
      binary [FINISH]-masked reward, same for both roles), "judge" ([[A]]/[[B]] verdicts).
    correct_reward / wrong_boxed_reward / no_format_reward: the reasoning agent's three levels.
    mta_boxed_penalty: added to the meta-thinking reward when the plan itself writes \\boxed.
    format_check: "boxed" (any \\boxed, the paper's wording) or "nonempty_boxed" (the last box
      must hold a non-empty answer) for the reasoning agent's -0.5 vs -1 distinction.
    """

    kind: str = "paper"
    correct_reward: float = 1.0
    wrong_boxed_reward: float = -0.5
    no_format_reward: float = -1.0
    mta_boxed_penalty: float = -1.0
    format_check: str = "boxed"

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"RewardConfig.kind={self.kind!r} is unknown; valid: {REWARD_KINDS}")
        if self.format_check not in FORMAT_CHECKS:
            raise ValueError(f"RewardConfig.format_check={self.format_check!r} is unknown; valid: {FORMAT_CHECKS}")
        if self.mta_boxed_penalty > 0:
            raise ValueError(f"RewardConfig.mta_boxed_penalty must be <= 0 (a penalty), got {self.mta_boxed_penalty}")


def has_answer_format(text: str, format_check: str = "boxed") -> bool:
    """Whether `text` shows the answer format: any \\boxed ("boxed") or a non-empty last box."""
    if format_check == "boxed":
        return has_boxed(text)
    if format_check == "nonempty_boxed":
        return strict_boxed_answer(text) is not None
    raise ValueError(f"format_check={format_check!r} is unknown; valid: {FORMAT_CHECKS}")


def paper_reasoning_reward(correct: bool, response: str, cfg: RewardConfig = RewardConfig()) -> float:
    """Paper single-turn low-level reward (App. C.2).

    R_l = +1 if correct; else -0.5 if the response has the answer format (\\boxed); else -1.
    """
    if correct:
        return cfg.correct_reward
    if has_answer_format(response, cfg.format_check):
        return cfg.wrong_boxed_reward
    return cfg.no_format_reward


def mta_boxed_penalty(plan: str, cfg: RewardConfig = RewardConfig()) -> float:
    """The meta-thinking agent's format penalty: `cfg.mta_boxed_penalty` if the plan writes \\boxed."""
    return cfg.mta_boxed_penalty if has_boxed(plan) else 0.0


def paper_meta_thinking_reward(ra_correct: Sequence[bool], plan: str, cfg: RewardConfig = RewardConfig()) -> float:
    """Paper single-turn high-level reward (App. C.2).

    R_h = mean_i 1[RA sample i for this plan is correct] + (-1 if the plan writes \\boxed else 0).
    """
    if len(ra_correct) == 0:
        raise ValueError("paper_meta_thinking_reward: need at least one reasoning-agent sample")
    return sum(bool(c) for c in ra_correct) / len(ra_correct) + mta_boxed_penalty(plan, cfg)


def _normalize_answer(ans: Optional[str]) -> Optional[str]:
    if ans is None:
        return None
    ans = re.sub(r"\s+", "", ans)
    return ans or None


def consistency_reward(ra_answers: Sequence[Optional[str]], plan: str, cfg: RewardConfig = RewardConfig()) -> float:
    """Consistency-based high-level reward (paper App. C.2 ablation).

    R_h = max_a count(a) / n over the RA samples' answers (whitespace-insensitive string match),
    0 when more than half of the samples have no answer (None), plus the \\boxed penalty.
    """
    n = len(ra_answers)
    if n == 0:
        raise ValueError("consistency_reward: need at least one reasoning-agent sample")
    norm = [_normalize_answer(a) for a in ra_answers]
    answered = [a for a in norm if a is not None]
    if 2 * (n - len(answered)) > n:
        base = 0.0
    else:
        base = max(collections.Counter(answered).values()) / n
    return base + mta_boxed_penalty(plan, cfg)


def multi_turn_reward(finish_reason: str, correct: bool) -> float:
    """Official multi-turn reward (spec §4.2/§4.3, mask_unfinished_reward=True).

    1 iff the trajectory finished through [FINISH] (finish_reason == FINISHED) and the final RA
    answer is correct, else 0 (reach_max_turn, over-length, truncated...). Both roles get it.
    """
    if not isinstance(finish_reason, str):
        raise TypeError(f"multi_turn_reward: finish_reason must be str, got {type(finish_reason)}")
    return 1.0 if (finish_reason == FINISHED and correct) else 0.0


_VERDICT_A = re.compile(r"\[\[\s*A\s*\]\]")
_VERDICT_B = re.compile(r"\[\[\s*B\s*\]\]")
JUDGE_LABELS = ("A>B", "B>A")


def parse_verdict(text: str) -> Optional[str]:
    """The judge's verdict "A" or "B" from "[[A]]"/"[[B]]"; None if neither or both appear."""
    a = _VERDICT_A.search(text) is not None
    b = _VERDICT_B.search(text) is not None
    if a == b:
        return None
    return "A" if a else "B"


def judge_reward(response: str, label: str) -> float:
    """1 iff the parsed verdict matches the label ("A>B" means A is preferred); else 0."""
    if label not in JUDGE_LABELS:
        raise ValueError(f"judge_reward: label must be one of {JUDGE_LABELS}, got {label!r}")
    verdict = parse_verdict(response)
    return 1.0 if verdict is not None and verdict == label[0] else 0.0
