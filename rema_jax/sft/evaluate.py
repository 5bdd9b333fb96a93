"""Greedy single-turn ReMA (or VRP) evaluation for SFT: accuracy and the share of non-empty ``\\boxed{}``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rema_jax.rewards.math_grading import grade_batch, strict_boxed_answer
from rema_jax.rollout import ChatEncoder, RolloutConfig, make_sampler_policy, run_rollout
from rema_jax.tasks.types import Task


def evaluate_agents(
    sampler,
    encoder: ChatEncoder,
    base,
    adapters_by_role: Mapping[str, Any],
    tasks: Sequence[Task],
    *,
    max_new_tokens: int = 128,
    max_prompt_len: int = 512,
    prompt_variant: str | None = None,
    grade_timeout: float = 10.0,
    mode: str = "single_turn",
) -> dict[str, Any]:
    """Plans then solutions (``mode="single_turn"``) or solutions alone (``"vrp"``), greedy, one per
    task. Returns accuracy, boxed_rate (fractions) and samples."""
    config = RolloutConfig(
        mode=mode,
        prompt_variant=prompt_variant,
        num_samples=1,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        stop_when_truncated=False,
        greedy=True,
    )
    policy = make_sampler_policy(sampler, base, adapters_by_role, seed=0)
    trajs = run_rollout(policy, encoder, [t.question for t in tasks], config)
    finals = [tr.final_answer or "" for tr in trajs]
    grades = grade_batch(finals, [t.answer for t in tasks], timeout=grade_timeout)
    samples = [
        {
            "uid": t.uid,
            "question": t.question,
            "gold": t.answer,
            "plan": tr.turns[0].text if mode == "single_turn" and tr.turns else "",
            "solution": f,
            "correct": bool(g.correct),
            "boxed": strict_boxed_answer(f) is not None,
        }
        for t, tr, f, g in zip(tasks, trajs, finals, grades)
    ]
    n = max(len(samples), 1)
    return {
        "accuracy": sum(s["correct"] for s in samples) / n,
        "boxed_rate": sum(s["boxed"] for s in samples) / n,
        "samples": samples,
    }
