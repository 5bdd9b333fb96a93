"""Rollout records: the policy protocol, turns, trajectories and the trainer-facing `RoleSequences`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from rema_jax.sampling import Generation, SamplingParams

# Trajectory finish reasons, exactly these strings (docs/architecture.md, Contract 4).
FINISHED = "finished"
TRUNCATED = "truncated"
CONVERSATION_TOO_LONG = "conversation_too_long"
OUT_OF_TURNS = "out_of_turns"
FINISH_REASONS = (FINISHED, TRUNCATED, CONVERSATION_TOO_LONG, OUT_OF_TURNS)
FinishReason = Literal["finished", "truncated", "conversation_too_long", "out_of_turns"]

# Per-turn stop reasons: the sampler's "stop" / "length", plus "dummy" for the empty reasoning
# message appended when a trajectory ends before the reasoning agent could answer.
TURN_DUMMY = "dummy"

Policy = Callable[[str, list[list[int]], SamplingParams], list[Generation]]
"""``policy(role, prompts_ids, sampling) -> one Generation per prompt``; role is one of
``"meta_thinking"``, ``"reasoning"``, ``"single"``. One call per role per turn, batched over every
live trajectory."""


@dataclasses.dataclass(frozen=True)
class Turn:
    """One message of a trajectory.

    Attributes:
      role: the agent that wrote it.
      turn: 0-based turn index of that agent (its t-th message).
      text: the text view (reasoning agent: ``[FINISH]`` removed, then rstripped; "" when dummy).
      token_ids: exactly the sampled ids (incl. sampled EOS and stop-string tokens; () when dummy).
      logprobs: behaviour log-prob of each sampled id.
      stop_reason: ``"stop"``, ``"length"`` or ``"dummy"``.
      prompt_len: token length of the prompt this agent was fed for this turn (0 when dummy).
      prompt_hash: hash of those prompt ids, to check that training sequences contain them verbatim.
    """

    role: str
    turn: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    stop_reason: str
    prompt_len: int = 0
    prompt_hash: int = 0

    @property
    def is_dummy(self) -> bool:
        return self.stop_reason == TURN_DUMMY

    @property
    def truncated(self) -> bool:
        return self.stop_reason == "length"


@dataclasses.dataclass
class Trajectory:
    """One sampled conversation for one question.

    Attributes:
      question_index: index of the question in the rollout's input (the GRPO group).
      sample_index: which of the ``n`` samples of that question.
      question: the question fields (``{"question": ...}``, judge: plus ``answer_a``/``answer_b``).
      turns: the messages in order (multi-turn: MTA, RA, MTA, RA, ...; VRP/MRP: one ``single``).
      finish_reason: one of ``FINISH_REASONS``; None while the rollout is running.
    """

    question_index: int
    sample_index: int
    question: Mapping[str, str]
    turns: list[Turn] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def turns_of(self, role: str, *, include_dummy: bool = True) -> list[Turn]:
        return [t for t in self.turns if t.role == role and (include_dummy or not t.is_dummy)]

    @property
    def num_turns(self) -> int:
        """Rounds played: ``len(turns) // 2`` for two agents (as the official code), 1 for one."""
        roles = {t.role for t in self.turns}
        return len(self.turns) // max(len(roles), 1)

    @property
    def final_answer(self) -> str:
        """The last reasoning (or single-agent) message's text."""
        for t in reversed(self.turns):
            if t.role != "meta_thinking":
                return t.text
        return ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RoleSequences:
    """Training sequences of one role, one row per trajectory (Contract 4, docs/architecture.md).

    Right-padded to a bucketed static length ``L``. Position ``t`` holds a target token: the model
    predicts ``tokens[:, t]`` from the logits at ``t - 1``.

    Attributes:
      role: ``"meta_thinking"``, ``"reasoning"`` or ``"single"``.
      tokens: ``[N, L] int32`` the chat as the role saw it, sampled ids spliced in; pad id after.
      loss_mask: ``[N, L] float32`` 1 on this role's generated tokens (+ labelled end-of-turn EOS).
      turn_ids: ``[N, L] int32`` the turn index of each loss token, -1 elsewhere.
      behaviour_logprobs: ``[N, L] float32`` sampling log-prob of each sampled token, 0 elsewhere.
      eos_label_mask: ``[N, L] float32`` 1 on labelled end-of-turn EOS tokens that were *not*
        sampled (turn stopped on a stop string); their behaviour log-prob is 0.0, a placeholder.
      attention_mask: ``[N, L] int32`` 1 on real tokens, 0 on right padding.
      group_ids: ``[N] int32`` question index (GRPO groups are (role, question)).
      sample_ids: ``[N] int32`` sample index within the group.
      num_turns: ``[N] int32`` number of this role's non-dummy turns.
      rewards: ``[N] float32`` filled by the reward step (zeros here).
    """

    role: str
    tokens: np.ndarray
    loss_mask: np.ndarray
    turn_ids: np.ndarray
    behaviour_logprobs: np.ndarray
    eos_label_mask: np.ndarray
    attention_mask: np.ndarray
    group_ids: np.ndarray
    sample_ids: np.ndarray
    num_turns: np.ndarray
    rewards: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def as_dict(self) -> dict[str, np.ndarray]:
        """The array fields (no ``role``), e.g. to feed a jitted step."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "role"}


def check_generations(role: str, gens: Sequence[Generation], n_prompts: int) -> None:
    """Validates a policy's answer for one call (clear errors instead of silent misalignment)."""
    if len(gens) != n_prompts:
        raise ValueError(f"policy returned {len(gens)} generations for {n_prompts} {role} prompts")
    for i, g in enumerate(gens):
        if len(g.token_ids) != len(g.logprobs):
            raise ValueError(f"{role} generation {i}: {len(g.token_ids)} token ids but {len(g.logprobs)} logprobs")
        if g.finish_reason not in ("stop", "length"):
            raise ValueError(
                f"{role} generation {i}: finish_reason must be 'stop' or 'length', got {g.finish_reason!r}"
            )
