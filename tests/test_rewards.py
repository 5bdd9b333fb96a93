"""Reward shapings: paper single-turn, consistency, multi-turn, judge."""

import pytest

from rema_jax.rewards import shaping as sh


@pytest.mark.parametrize(
    "correct,response,expected",
    [
        (True, "\\boxed{3}", 1.0),
        (True, "the answer is 3", 1.0),  # correct without box still +1
        (False, "\\boxed{4}", -0.5),
        (False, "\\boxed{}", -0.5),  # paper wording: any \boxed counts as the format
        (False, "the answer is 4", -1.0),
    ],
)
def test_paper_reasoning_reward(correct, response, expected):
    assert sh.paper_reasoning_reward(correct, response) == expected


def test_paper_reasoning_reward_strict_format():
    cfg = sh.RewardConfig(format_check="nonempty_boxed")
    assert sh.paper_reasoning_reward(False, "\\boxed{} 4", cfg) == -1.0
    assert sh.paper_reasoning_reward(False, "\\boxed{4}", cfg) == -0.5


def test_paper_meta_thinking_reward():
    assert sh.paper_meta_thinking_reward([True, False, True, True], "plan") == 0.75
    assert sh.paper_meta_thinking_reward([True, True], "answer \\boxed{2}") == 0.0
    assert sh.paper_meta_thinking_reward([False], "\\boxed{2}") == -1.0
    with pytest.raises(ValueError, match="at least one"):
        sh.paper_meta_thinking_reward([], "plan")


def test_consistency_reward():
    assert sh.consistency_reward(["2", "2", "3", "2"], "plan") == 0.75
    assert sh.consistency_reward(["2", " 2 ", None, "3"], "plan") == 0.5  # whitespace-insensitive
    assert sh.consistency_reward([None, None, None, "3"], "plan") == 0.0  # most have no answer
    assert sh.consistency_reward([None, None, "3", "3"], "plan") == 0.5  # exactly half: not most
    assert sh.consistency_reward(["1", "1"], "\\boxed{1}") == 0.0  # penalty kept


def test_multi_turn_reward():
    assert sh.multi_turn_reward(sh.FINISHED, True) == 1.0
    assert sh.multi_turn_reward(sh.FINISHED, False) == 0.0
    for reason in ("reach_max_turn", "completion_token_exceeded", "stop_when_truncated"):
        assert sh.multi_turn_reward(reason, True) == 0.0
    with pytest.raises(TypeError):
        sh.multi_turn_reward(None, True)


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("... so my final verdict is [[A]]", "A"),
        ("[[B]]", "B"),
        ("[[ B ]]", "B"),
        ("[A]", None),  # single brackets do not count
        ("[[A]] or maybe [[B]]", None),  # both: unparseable
        ("", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert sh.parse_verdict(text) == verdict


def test_judge_reward():
    assert sh.judge_reward("[[A]]", "A>B") == 1.0
    assert sh.judge_reward("[[A]]", "B>A") == 0.0
    assert sh.judge_reward("[[B]]", "B>A") == 1.0
    assert sh.judge_reward("[[A]] [[B]]", "A>B") == 0.0
    assert sh.judge_reward("no verdict", "B>A") == 0.0
    with pytest.raises(ValueError, match="label must be one of"):
        sh.judge_reward("[[A]]", "A")


def test_reward_config_validation():
    with pytest.raises(ValueError, match="valid: \\('paper'"):
        sh.RewardConfig(kind="ppo")
    with pytest.raises(ValueError, match="format_check"):
        sh.RewardConfig(format_check="strict")
    with pytest.raises(ValueError, match="penalty"):
        sh.RewardConfig(mta_boxed_penalty=1.0)
