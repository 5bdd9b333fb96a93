"""experience.collect: rollout → grading → per-role rewards, group ids and training rows.

The policy is scripted (no model) and the grader is a fake (a boxed answer equal to the gold
answer is correct), so every reward is known exactly: the single-turn plan fan-out
(``solutions_per_plan > 1``: one plan per block, answered k times), the meta-thinking block reward
with its \\boxed penalty, the consistency and judge rewards, the multi-turn [FINISH]-masked reward
and the group ids GRPO groups by. The tokenizer is a tiny byte-level BPE trained in-test.
"""

import re

import numpy as np
import pytest

from rema_jax import rewards as rewards_lib
from rema_jax import rollout as R
from rema_jax.models.testing import chatml_bpe_tokenizer
from rema_jax.rollout import prompts as P
from rema_jax.sampling import Generation
from rema_jax.tasks.types import Task, judge_task
from rema_jax.training import experience as E

MTA, RA, SINGLE = P.META_THINKING, P.REASONING, P.SINGLE


def _tokenizer():
    return chatml_bpe_tokenizer("Plan 0 1 2 3: add the numbers. [FINISH] \\boxed{3} [[A]] [[B]]")


@pytest.fixture
def tok():
    return _tokenizer()


@pytest.fixture
def enc(tok):
    return R.ChatEncoder(tok)


class ScriptedPolicy:
    """``answer(role, prompt_text, row) -> (text, how)`` for each prompt of a call; records calls.

    ``how``: "eos" (text + a sampled EOS) or "stop" (text ends with [FINISH], stopped on it).
    """

    def __init__(self, tok, answer):
        self.tok, self.answer, self.calls = tok, answer, []

    def __call__(self, role, prompts, sampling):
        self.calls.append((role, [list(p) for p in prompts], sampling))
        out = []
        for row, p in enumerate(prompts):
            text, how = self.answer(role, self.tok.decode(p), row)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if how == "eos":
                ids = ids + [self.tok.eos_token_id]
            else:
                assert how == "stop" and text.endswith(P.FINISH_FLAG)
            out.append(Generation(list(ids), [-0.25] * len(ids), "stop", text))
        return out

    def calls_of(self, role):
        return [c for c in self.calls if c[0] == role]


def fake_grade(predictions, tasks):
    """Correct iff the last \\boxed{} equals the gold answer (whitespace-insensitive)."""
    out = []
    for text, task in zip(predictions, tasks):
        boxed = rewards_lib.extract_boxed(text)
        out.append(
            rewards_lib.GradeResult(
                correct=boxed is not None and re.sub(r"\s", "", boxed) == task.answer, extracted=boxed
            )
        )
    return out


def no_grading(predictions, tasks):
    raise AssertionError("judge rewards must not call the math grader")


def _tasks(*answers):
    return [Task(uid=f"q{i}", question=f"What is {a} + 0? (question {i})", answer=a) for i, a in enumerate(answers)]


def _single_turn(**kw):
    kw.setdefault("mode", "single_turn")
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("max_prompt_len", 2048)
    return R.RolloutConfig(**kw)


def _plan_responder(plans, solutions):
    """MTA: the i-th prompt of its (only) call gets ``plans[i]``; RA: the solutions of the plan
    its prompt shows, in order (so a reasoning prompt that shows the wrong plan is caught)."""
    used = {}

    def answer(role, text, row):
        if role == MTA:
            return plans[row], "eos"
        seen = [i for i, p in enumerate(plans) if p in text]
        assert len(seen) == 1, f"the reasoning prompt shows plans {seen}: {text!r}"
        i = seen[0]
        used[i] = used.get(i, 0) + 1
        return solutions[i][used[i] - 1], "eos"

    return answer


def test_plan_fan_out_block_rewards_and_group_ids(tok, enc):
    """2 questions × 2 plans × 2 solutions: one MTA call over 4 plan prompts, 8 RA rows; each
    plan's reward is the mean correctness of ITS two solutions (−1 when the plan boxes)."""
    tasks = _tasks("3", "5")
    plans = ["Plan 0: add.", "Plan 1: count.", "Plan 2: the answer is \\boxed{5}.", "Plan 3: sum."]
    solutions = [
        ["So \\boxed{3}.", "So \\boxed{4}."],  # correct, wrong but boxed
        ["\\boxed{3}", "It is \\boxed{ 3 }"],  # both correct
        ["\\boxed{5}", "\\boxed{5}"],  # both correct, but the plan boxes
        ["\\boxed{5}", "It is 5."],
    ]  # correct, no box
    pol = ScriptedPolicy(tok, _plan_responder(plans, solutions))
    exp = E.collect(
        pol,
        enc,
        tasks,
        _single_turn(num_samples=2),
        rewards_lib.RewardConfig(kind="paper"),
        fake_grade,
        solutions_per_plan=2,
    )

    ((role, mta_prompts, _),) = pol.calls_of(MTA)
    assert len(mta_prompts) == 4  # one plan per block, not per row
    assert mta_prompts[0] == mta_prompts[1] != mta_prompts[2] == mta_prompts[3]
    ((_, ra_prompts, _),) = pol.calls_of(RA)
    assert len(ra_prompts) == 8

    trajs = exp.trajectories
    assert [t.question_index for t in trajs] == [0] * 4 + [1] * 4
    assert [t.sample_index for t in trajs] == [0, 1, 2, 3] * 2
    for i, tr in enumerate(trajs):  # row i answers plan i // 2
        assert tr.turns_of(MTA)[0].text == plans[i // 2]
        assert tr.turns_of(MTA)[0].token_ids == trajs[2 * (i // 2)].turns_of(MTA)[0].token_ids
        assert tr.final_answer == solutions[i // 2][i % 2]
    assert exp.correct == [True, False, True, True, True, True, True, False]
    np.testing.assert_array_equal(exp.rewards[RA], [1.0, -0.5, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    assert [id(t) for t in exp.rows[RA]] == [id(t) for t in trajs]
    assert [id(t) for t in exp.rows[MTA]] == [id(trajs[i]) for i in (0, 2, 4, 6)]
    np.testing.assert_array_equal(exp.rewards[MTA], [0.5, 1.0, 0.0, 0.5])
    np.testing.assert_array_equal(exp.group_ids[RA], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(exp.group_ids[MTA], [0, 0, 1, 1])
    assert exp.rewards[MTA].dtype == exp.rewards[RA].dtype == np.float32
    assert exp.grade_stats["accuracy"] == pytest.approx(6 / 8)

    m = E.rollout_metrics(exp)
    assert m["train/accuracy"] == pytest.approx(6 / 8)
    assert m[f"{MTA}/reward_mean"] == pytest.approx(0.5) and m[f"{RA}/reward_mean"] == pytest.approx(4.5 / 8)
    assert m[f"{MTA}/frac_reward_zero_std"] == 0.0 and m["finish/finished"] == 1.0

    # The trainer's MTA rows (one per plan) hold exactly the plan's sampled ids under the loss mask.
    rollout_k = _single_turn(num_samples=4)
    seqs = R.build_role_sequences(exp.rows[MTA], enc, rollout_k, MTA)
    for row, tr in zip(range(4), exp.rows[MTA]):
        got = seqs.tokens[row][seqs.loss_mask[row] > 0].tolist()
        assert got == list(tr.turns_of(MTA)[0].token_ids)


def test_fan_out_with_one_solution_per_plan_is_one_plan_per_row(tok, enc):
    tasks = _tasks("3")
    plans = ["Plan 0: add.", "Plan 1: count."]
    pol = ScriptedPolicy(tok, _plan_responder(plans, [["\\boxed{3}"], ["\\boxed{2}"]]))
    exp = E.collect(pol, enc, tasks, _single_turn(num_samples=2), rewards_lib.RewardConfig(), fake_grade)
    assert len(pol.calls_of(MTA)[0][1]) == 2
    np.testing.assert_array_equal(exp.rewards[MTA], [1.0, 0.0])
    np.testing.assert_array_equal(exp.rewards[RA], [1.0, -0.5])
    np.testing.assert_array_equal(exp.group_ids[MTA], [0, 0])


def test_consistency_reward_uses_answer_agreement_not_correctness(tok, enc):
    """Block 0 agrees 2/3 on a WRONG answer (paper reward would be 1/3); block 1 has more than
    half unanswered (0) and a boxing plan (−1)."""
    tasks = _tasks("8")
    plans = ["Plan 0: add.", "Plan 1: \\boxed{8}"]
    solutions = [["\\boxed{7}", "so \\boxed{ 7 }", "\\boxed{8}"], ["no answer", "still none", "\\boxed{8}"]]
    pol = ScriptedPolicy(tok, _plan_responder(plans, solutions))
    exp = E.collect(
        pol,
        enc,
        tasks,
        _single_turn(num_samples=2),
        rewards_lib.RewardConfig(kind="consistency"),
        fake_grade,
        solutions_per_plan=3,
    )
    assert len(pol.calls_of(MTA)[0][1]) == 2 and len(pol.calls_of(RA)[0][1]) == 6
    np.testing.assert_allclose(exp.rewards[MTA], [2 / 3, -1.0], rtol=1e-6)
    # the reasoning agent keeps the paper's low-level reward
    np.testing.assert_array_equal(exp.rewards[RA], [-0.5, -0.5, 1.0, -1.0, -1.0, 1.0])
    np.testing.assert_array_equal(exp.group_ids[MTA], [0, 0])


def test_judge_rewards_from_verdicts_without_the_math_grader(tok, enc):
    tasks = [
        judge_task("j0", "Which is right?", "2+2=4", "2+2=5", "A>B"),
        judge_task("j1", "Which is right?", "3+3=7", "3+3=6", "B>A"),
    ]
    plans = ["Plan 0: check A.", "Plan 1: check B."]
    solutions = [
        ["[[A]]", "I pick [[A]]."],  # both right
        ["[[B]]", "[[A]] or [[B]]"],
    ]  # right, no single verdict
    pol = ScriptedPolicy(tok, _plan_responder(plans, solutions))
    cfg = _single_turn(num_samples=1, task="judge")
    exp = E.collect(pol, enc, tasks, cfg, rewards_lib.RewardConfig(kind="judge"), no_grading, solutions_per_plan=2)
    ra_texts = [tok.decode(p) for p in pol.calls_of(RA)[0][1]]
    assert all("2+2=5" in t for t in ra_texts[:2]) and all("3+3=7" in t for t in ra_texts[2:])
    assert exp.correct == [True, True, True, False]
    np.testing.assert_array_equal(exp.rewards[RA], [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(exp.rewards[MTA], [1.0, 0.5])
    np.testing.assert_array_equal(exp.group_ids[MTA], [0, 1])
    np.testing.assert_array_equal(exp.group_ids[RA], [0, 0, 1, 1])
    assert exp.grade_stats == {"accuracy": 0.75}


def test_multi_turn_reward_needs_finish_and_correctness_for_both_roles(tok, enc):
    """Sample 0 finishes through [FINISH] correct (1); sample 1 finishes wrong (0); sample 2 is
    correct but never says [FINISH] and runs out of turns (0)."""
    tasks = _tasks("3")
    mta = {0: "Add them. [FINISH]", 1: "Guess. [FINISH]", 2: "Keep going."}
    ra = {0: "\\boxed{3}", 1: "\\boxed{4}", 2: "\\boxed{3}"}

    def answer(role, text, row):
        if role == MTA:
            t = mta[row]
            return t, ("stop" if t.endswith(P.FINISH_FLAG) else "eos")
        return ra[row], "eos"

    pol = ScriptedPolicy(tok, answer)
    cfg = R.RolloutConfig(mode="multi_turn", num_samples=3, max_turns=1, max_new_tokens=64, max_prompt_len=2048)
    exp = E.collect(pol, enc, tasks, cfg, rewards_lib.RewardConfig(kind="multi_turn"), fake_grade)
    assert [t.finish_reason for t in exp.trajectories] == ["finished", "finished", "out_of_turns"]
    assert exp.correct == [True, False, True]
    for role in (MTA, RA):
        assert [id(t) for t in exp.rows[role]] == [id(t) for t in exp.trajectories]
        np.testing.assert_array_equal(exp.rewards[role], [1.0, 0.0, 0.0])
        np.testing.assert_array_equal(exp.group_ids[role], [0, 0, 0])


@pytest.mark.parametrize("mode", ["vrp", "mrp"])
def test_single_agent_low_level_reward_and_groups(tok, enc, mode):
    tasks = _tasks("3", "5")
    answers = ["\\boxed{3}", "\\boxed{2}", "no box", "\\boxed{5}"]
    pol = ScriptedPolicy(tok, lambda role, text, row: (answers[row], "eos"))
    exp = E.collect(pol, enc, tasks, _single_turn(mode=mode, num_samples=2), rewards_lib.RewardConfig(), fake_grade)
    assert set(exp.rewards) == {SINGLE} and [c[0] for c in pol.calls] == [SINGLE]
    np.testing.assert_array_equal(exp.rewards[SINGLE], [1.0, -0.5, -1.0, 1.0])
    np.testing.assert_array_equal(exp.group_ids[SINGLE], [0, 0, 1, 1])


def test_sampling_overrides_reach_each_role(tok, enc):
    plans = ["Plan 0: add.", "Plan 1: count."]
    pol = ScriptedPolicy(tok, _plan_responder(plans, [["\\boxed{3}"] * 2, ["\\boxed{3}"] * 2]))
    E.collect(
        pol,
        enc,
        _tasks("3"),
        _single_turn(num_samples=2, temperature=0.7),
        rewards_lib.RewardConfig(),
        fake_grade,
        solutions_per_plan=2,
        sampling_overrides={MTA: {"greedy": True}, RA: {"greedy": False, "temperature": 1.0}},
    )
    ((_, _, mta_sp),) = pol.calls_of(MTA)
    ((_, _, ra_sp),) = pol.calls_of(RA)
    assert mta_sp.greedy and mta_sp.temperature == 0.7
    assert not ra_sp.greedy and ra_sp.temperature == 1.0


def test_collect_errors(tok, enc):
    pol = ScriptedPolicy(tok, lambda role, text, row: ("x", "eos"))
    cfg = R.RolloutConfig(mode="multi_turn", num_samples=2, max_new_tokens=8, max_prompt_len=2048)
    with pytest.raises(ValueError, match="solutions_per_plan=2 only applies to mode 'single_turn'"):
        E.collect(
            pol, enc, _tasks("3"), cfg, rewards_lib.RewardConfig(kind="multi_turn"), fake_grade, solutions_per_plan=2
        )
    fanned = E.fan_out_plans(pol, 2)
    with pytest.raises(ValueError, match="prompts inside a block differ"):
        fanned(MTA, [[1, 2], [1, 3]], None)
    with pytest.raises(ValueError, match="do not split into blocks of 2"):
        fanned(MTA, [[1, 2], [1, 2], [1, 2]], None)
