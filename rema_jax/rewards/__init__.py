"""Rewards: math-verify grading with timeouts and the ReMA reward shapings (no JAX imports)."""

from rema_jax.rewards.math_grading import (
    GradeResult,
    GradingConfig,
    GradingError,
    MathGrader,
    extract_boxed,
    get_grader,
    grade_batch,
    grading_metrics,
    has_boxed,
    strict_boxed_answer,
    verify_answer,
)
from rema_jax.rewards.shaping import (
    FINISHED,
    RewardConfig,
    consistency_reward,
    has_answer_format,
    judge_reward,
    mta_boxed_penalty,
    multi_turn_reward,
    paper_meta_thinking_reward,
    paper_reasoning_reward,
    parse_verdict,
)
