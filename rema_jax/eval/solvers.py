"""Solvers for the harness: `Task`s -> rollouts through the jitted sampler -> final answers.

A solver wraps `rema_jax.rollout.run_rollout` (VRP, MRP, single- or multi-turn MAMRP) with a
`Policy` (normally `make_sampler_policy`), one rollout call per harness batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rema_jax.rollout import RolloutConfig, Trajectory, run_rollout
from rema_jax.rollout.prompts import judge_fields
from rema_jax.tasks.types import Task

# Harness mode names -> rollout modes, and the paper's column titles.
MODES = {"vrp": "vrp", "mrp": "mrp", "rema_single_turn": "single_turn", "rema_multi_turn": "multi_turn"}
MODE_TITLES = {
    "vrp": "VRP",
    "mrp": "MRP",
    "rema_single_turn": "ReMA (single-turn)",
    "rema_multi_turn": "ReMA (multi-turn)",
}


def trajectory_output(traj: Trajectory) -> dict[str, Any]:
    """The harness record of one trajectory: final answer, every message, how it ended."""
    return {
        "final_answer": traj.final_answer,
        "messages": [{"role": t.role, "content": t.text, "stop_reason": t.stop_reason} for t in traj.turns],
        "finish_reason": traj.finish_reason,
        "num_turns": traj.num_turns,
        "generated_tokens": sum(len(t.token_ids) for t in traj.turns),
    }


def task_question(task: Task) -> str | dict[str, str]:
    """The rollout's question fields: the text for math, question + both responses for judge."""
    if task.kind == "judge":
        return judge_fields(task.question, task.response_a, task.response_b)
    return task.question


def rollout_solver(policy, encoder, config: RolloutConfig, judge_config: RolloutConfig | None = None):
    """``solve_fn(tasks) -> [output dict]`` running one rollout per call (one sample per task).

    Args:
      policy: ``policy(role, prompt_ids, sampling) -> [Generation]`` (see `rema_jax.rollout.Policy`).
      encoder: the `ChatEncoder` of the model's tokenizer.
      config: rollout settings for math tasks (``num_samples`` must be 1: the harness repeats tasks).
      judge_config: rollout settings for judge tasks (``task="judge"``); None = judge tasks rejected.
    """
    for c in (config, judge_config):
        if c is not None and c.num_samples != 1:
            raise ValueError("rollout_solver: set num_samples=1; the harness draws repeated samples itself")

    def solve(tasks: Sequence[Task]) -> list[dict[str, Any]]:
        kinds = {t.kind for t in tasks}
        if len(kinds) != 1:
            raise ValueError(f"rollout_solver: one task kind per batch, got {sorted(kinds)}")
        cfg = config
        if kinds == {"judge"}:
            if judge_config is None:
                raise ValueError("rollout_solver: judge tasks need a judge_config (task='judge')")
            cfg = judge_config
        trajs = run_rollout(policy, encoder, [task_question(t) for t in tasks], cfg)
        return [trajectory_output(tr) for tr in trajs]

    return solve


def rollout_configs(
    mode: str,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 512,
    max_turns: int = 30,
    max_prompt_len: int = 2048,
    prompt_variant: str | None = None,
    stop_when_truncated: bool | None = None,
) -> tuple[RolloutConfig, RolloutConfig | None]:
    """(math config, judge config or None when the mode has no judge prompts) for a harness mode.

    ``stop_when_truncated=None`` picks the mode's default: True for multi-turn (the official
    rollout ends a trajectory whose turn hit the token limit), False for single-turn modes, so
    the reasoning agent still answers after a meta-thinking plan cut at ``max_new_tokens``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r}; expected one of {sorted(MODES)}")
    if stop_when_truncated is None:
        stop_when_truncated = MODES[mode] == "multi_turn"
    kw = dict(
        mode=MODES[mode],
        prompt_variant=prompt_variant,
        num_samples=1,
        greedy=greedy,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        max_turns=max_turns,
        max_prompt_len=max_prompt_len,
        stop_when_truncated=stop_when_truncated,
    )
    math_cfg = RolloutConfig(task="math", **kw)
    try:
        judge_cfg = RolloutConfig(task="judge", **kw)
    except ValueError:
        judge_cfg = None
    return math_cfg, judge_cfg


def agent_roles(mode: str) -> tuple[str, ...]:
    return ("single",) if MODES[mode] in ("vrp", "mrp") else ("meta_thinking", "reasoning")


def adapters_for(mode: str, adapters: Mapping[str, Any]) -> dict[str, Any]:
    """``{role: adapter}`` for the mode's agents; roles without one use the base model (None).

    ``adapters`` keys: ``meta_thinking``, ``reasoning``, ``single``.
    """
    unknown = set(adapters) - {"meta_thinking", "reasoning", "single"}
    if unknown:
        raise ValueError(f"unknown agent roles {sorted(unknown)}")
    return {r: adapters.get(r) for r in agent_roles(mode)}
