"""Experience collection: tasks → rollouts → graded trajectories → per-role rewards.

This is the "rollout → reward" part of the data flow. It knows the ReMA reward rules per mode:

- ``vrp`` / ``mrp`` (one agent, role ``single``): the paper's low-level reward
  (+1 correct, −0.5 wrong but boxed, −1 otherwise).
- ``single_turn`` MAMRP: each question gets ``plans`` meta-thinking plans and each plan
  ``solutions_per_plan`` reasoning solutions (the plan is sampled once and fanned out, so the
  plan's reward is the mean correctness of *its* solutions, paper App. C.2). Reasoning rows:
  the low-level reward; meta-thinking rows (one per plan): mean correctness − 1 if the plan
  writes ``\\boxed`` (or the consistency reward in the ablation).
- ``multi_turn``: 1 iff the trajectory finished through ``[FINISH]`` and is correct, for both.
- judge tasks: 1 iff the ``[[A]]``/``[[B]]`` verdict matches the label.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rema_jax import rewards as rewards_lib
from rema_jax.rollout import META_THINKING, REASONING, SINGLE, ChatEncoder, RolloutConfig, Trajectory, run_rollout
from rema_jax.rollout.types import Policy
from rema_jax.sampling import Generation, SamplingParams
from rema_jax.tasks.types import Task


def fan_out_plans(policy: Policy, solutions_per_plan: int) -> Policy:
    """Sample one meta-thinking plan per block of ``solutions_per_plan`` identical prompts.

    ``run_rollout`` replicates each question ``n`` times; with ``n = plans × k`` this makes every
    plan answered by ``k`` reasoning samples, the paper's single-turn structure.
    """
    k = solutions_per_plan
    if k == 1:
        return policy

    def wrapped(role: str, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if role != META_THINKING:
            return policy(role, prompts, sampling)
        if len(prompts) % k:
            raise ValueError(f"{len(prompts)} meta-thinking prompts do not split into blocks of {k}")
        heads = prompts[::k]
        for b, head in enumerate(heads):
            if any(list(p) != list(head) for p in prompts[b * k : (b + 1) * k]):
                raise ValueError(
                    "fan_out_plans: prompts inside a block differ; it only applies to the first meta-thinking turn"
                )
        gens = policy(role, heads, sampling)
        return [g for g in gens for _ in range(k)]

    return wrapped


def with_sampling_overrides(policy: Policy, overrides: Mapping[str, Mapping[str, Any]]) -> Policy:
    """Per-role ``SamplingParams`` overrides, e.g. ``{"reasoning": {"greedy": True}}``."""
    if not overrides:
        return policy

    def wrapped(role, prompts, sampling):
        return policy(role, prompts, dataclasses.replace(sampling, **overrides.get(role, {})))

    return wrapped


@dataclasses.dataclass
class Experience:
    """Graded trajectories of one step plus the scalar reward of every training row.

    ``rows[role]`` lists the trajectories that become training rows for that role (for the
    meta-thinking agent in single-turn mode, the first trajectory of each plan block), and
    ``rewards[role]`` the matching float rewards. ``correct[i]`` is the verdict of trajectory i.
    """

    trajectories: list[Trajectory]
    correct: list[bool]
    rows: dict[str, list[Trajectory]]
    rewards: dict[str, np.ndarray]
    group_ids: dict[str, np.ndarray]
    grade_stats: dict[str, float]


GradeFn = Callable[[Sequence[str], Sequence[Task]], list[rewards_lib.GradeResult]]


def collect(
    policy: Policy,
    encoder: ChatEncoder,
    tasks: Sequence[Task],
    rollout: RolloutConfig,
    reward: rewards_lib.RewardConfig,
    grade_fn: GradeFn,
    *,
    solutions_per_plan: int = 1,
    sampling_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Experience:
    """Roll out ``tasks`` and compute every role's rewards (see the module docstring)."""
    k = solutions_per_plan
    if k > 1 and rollout.mode != "single_turn":
        raise ValueError(f"solutions_per_plan={k} only applies to mode 'single_turn', not {rollout.mode!r}")
    rollout_k = dataclasses.replace(rollout, num_samples=rollout.num_samples * k)
    pol = with_sampling_overrides(fan_out_plans(policy, k), sampling_overrides or {})
    questions = [_question_fields(t) for t in tasks]
    trajs = run_rollout(pol, encoder, questions, rollout_k)

    if reward.kind == "judge":
        scores = [rewards_lib.judge_reward(tr.final_answer, tasks[tr.question_index].label) for tr in trajs]
        correct = [s > 0 for s in scores]
        results = None
    else:
        results = grade_fn([tr.final_answer for tr in trajs], [tasks[tr.question_index] for tr in trajs])
        correct = [r.correct for r in results]
    stats = rewards_lib.grading_metrics(results) if results is not None else {"accuracy": float(np.mean(correct))}

    rows: dict[str, list[Trajectory]] = {}
    rews: dict[str, list[float]] = {}
    if rollout.agent_roles == (SINGLE,):
        rows[SINGLE] = trajs
        rews[SINGLE] = [_low_level_reward(reward, c, tr) for c, tr in zip(correct, trajs)]
    elif rollout.mode == "multi_turn":
        for role in (META_THINKING, REASONING):
            rows[role] = trajs
            rews[role] = [
                rewards_lib.multi_turn_reward(tr.finish_reason, c)
                if reward.kind != "judge"
                else (float(c) if tr.finish_reason == "finished" else 0.0)
                for c, tr in zip(correct, trajs)
            ]
    else:
        rows[REASONING] = trajs
        rews[REASONING] = [_low_level_reward(reward, c, tr) for c, tr in zip(correct, trajs)]
        rows[META_THINKING], rews[META_THINKING] = [], []
        for start in range(0, len(trajs), k):
            block = trajs[start : start + k]
            plan = block[0].turns_of(META_THINKING)[0].text
            block_correct = correct[start : start + k]
            if reward.kind == "consistency":
                answers = [rewards_lib.extract_boxed(tr.final_answer) for tr in block]
                r = rewards_lib.consistency_reward(answers, plan, reward)
            elif reward.kind == "judge":
                r = float(np.mean(block_correct))
            else:
                r = rewards_lib.paper_meta_thinking_reward(block_correct, plan, reward)
            rows[META_THINKING].append(block[0])
            rews[META_THINKING].append(r)
    return Experience(
        trajectories=trajs,
        correct=correct,
        rows=rows,
        rewards={r: np.asarray(v, np.float32) for r, v in rews.items()},
        group_ids={r: np.asarray([tr.question_index for tr in v], np.int32) for r, v in rows.items()},
        grade_stats=stats,
    )


def outcome_turn_rewards(rewards_b, turn_ids_bt, loss_mask_bt, max_turns: int) -> np.ndarray:
    """Per-turn rewards ``[B, max_turns]`` of an outcome reward: row ``i``'s scalar on its last turn
    (the largest turn id under its loss mask), 0 on the others and on rows without loss tokens.

    The official reward manager puts the multi-turn reward at turn ``num_turns - 1``; with
    gamma_turn = 1 the turn-level return is then ``R`` for every turn, which REINFORCE++ places on
    the last token of each turn (``rl.advantages.reinforce_pp_advantages(turn_rewards_bk=...)``).
    """
    r = np.asarray(rewards_b, np.float32)
    mask = np.asarray(loss_mask_bt) > 0
    last = np.where(mask, np.asarray(turn_ids_bt), -1).max(axis=1)
    if (last >= max_turns).any():
        raise ValueError(f"turn id {int(last.max())} >= max_turns={max_turns}")
    out = np.zeros((r.shape[0], max_turns), np.float32)
    rows = np.nonzero(last >= 0)[0]
    out[rows, last[rows]] = r[rows]
    return out


def _low_level_reward(reward: rewards_lib.RewardConfig, correct: bool, tr: Trajectory) -> float:
    if reward.kind == "judge":
        return float(correct)
    if reward.kind == "multi_turn":
        return rewards_lib.multi_turn_reward(tr.finish_reason, correct)
    return rewards_lib.paper_reasoning_reward(correct, tr.final_answer, reward)


def _question_fields(task: Task) -> dict[str, str] | str:
    if task.kind == "judge":
        return {"question": task.question, "answer_a": task.response_a, "answer_b": task.response_b}
    return task.question


def rollout_metrics(exp: Experience) -> dict[str, float]:
    """Per-role reward/length/turn statistics and finish-reason shares for logging."""
    out: dict[str, float] = {"train/accuracy": float(np.mean(exp.correct))}
    for k, v in exp.grade_stats.items():
        if k != "accuracy":
            out[f"train/{k}"] = float(v)
    for role, r in exp.rewards.items():
        out[f"{role}/reward_mean"] = float(r.mean())
        out[f"{role}/reward_std"] = float(r.std())
        lengths = [sum(len(t.token_ids) for t in tr.turns_of(role, include_dummy=False)) for tr in exp.rows[role]]
        out[f"{role}/response_length"] = float(np.mean(lengths))
        groups: dict[int, list[float]] = collections.defaultdict(list)
        for g, x in zip(exp.group_ids[role], r):
            groups[int(g)].append(float(x))
        out[f"{role}/frac_reward_zero_std"] = float(np.mean([np.std(v) == 0 for v in groups.values()]))
    out["train/turns"] = float(np.mean([tr.num_turns for tr in exp.trajectories]))
    reasons = collections.Counter(tr.finish_reason for tr in exp.trajectories)
    for reason in ("finished", "truncated", "conversation_too_long", "out_of_turns"):
        out[f"finish/{reason}"] = reasons.get(reason, 0) / len(exp.trajectories)
    return out
