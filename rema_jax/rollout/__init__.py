"""ReMA rollouts: prompts, VRP/MRP/MAMRP protocols, the multi-turn state machine, `RoleSequences`."""

from rema_jax.rollout import prompts
from rema_jax.rollout.chat import ChatEncoder, EncodedChat, GeneratedMessage, TextMessage
from rema_jax.rollout.policy import make_sampler_policy
from rema_jax.rollout.prompts import FINISH_FLAG, META_THINKING, REASONING, SINGLE, get_prompts
from rema_jax.rollout.protocol import RolloutConfig, as_question_fields, prefix_reuse_stats, role_view, run_rollout
from rema_jax.rollout.sequences import bucket_length, build_role_sequences
from rema_jax.rollout.types import (
    CONVERSATION_TOO_LONG,
    FINISH_REASONS,
    FINISHED,
    OUT_OF_TURNS,
    TRUNCATED,
    Policy,
    RoleSequences,
    Trajectory,
    Turn,
)

__all__ = [
    "CONVERSATION_TOO_LONG",
    "ChatEncoder",
    "EncodedChat",
    "FINISHED",
    "FINISH_FLAG",
    "FINISH_REASONS",
    "GeneratedMessage",
    "META_THINKING",
    "OUT_OF_TURNS",
    "Policy",
    "REASONING",
    "RoleSequences",
    "RolloutConfig",
    "SINGLE",
    "TRUNCATED",
    "TextMessage",
    "Trajectory",
    "Turn",
    "as_question_fields",
    "bucket_length",
    "build_role_sequences",
    "get_prompts",
    "make_sampler_policy",
    "prefix_reuse_stats",
    "prompts",
    "role_view",
    "run_rollout",
]
