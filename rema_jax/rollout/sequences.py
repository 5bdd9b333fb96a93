"""Trajectories -> `RoleSequences` (Contract 4): one right-padded training row per trajectory."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from rema_jax.rollout.chat import ChatEncoder
from rema_jax.rollout.protocol import RA, RolloutConfig, role_view
from rema_jax.rollout.types import RoleSequences, Trajectory

Bucket = Literal["pow2"] | int


def bucket_length(n: int, bucket: Bucket) -> int:
    """Smallest bucket >= n: a power of two (``"pow2"``) or a multiple of ``bucket``."""
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    if bucket == "pow2":
        return 1 << (n - 1).bit_length()
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be 'pow2' or a positive int, got {bucket!r}")
    return -(-n // bucket) * bucket


def build_role_sequences(
    trajectories: Sequence[Trajectory],
    encoder: ChatEncoder,
    config: RolloutConfig,
    role: str,
    *,
    bucket: Bucket = 64,
    pad_to: int | None = None,
    pad_id: int | None = None,
) -> RoleSequences:
    """One training row per trajectory for ``role``: the role's chat up to its last real turn.

    Each row is the role's view (system, first user message, its own turns as sampled ids, the other
    agent's messages as user text) ending right after its last non-dummy turn. A role that never
    spoke (reasoning agent after a dummy turn only) gets its first prompt and an all-zero loss mask,
    so rows stay aligned across roles.

    Args:
      bucket: ``L`` is rounded up to a power of two (``"pow2"``) or a multiple of this int.
      pad_to: fixed ``L`` instead (static shapes across steps); raises if a row is longer.
      pad_id: token id for padding; default the tokenizer's pad id, else its first EOS id.

    Raises:
      ValueError: if a turn's recorded prompt is not a prefix of the row (a chat template that is
        not prefix-stable would make the behaviour log-probs refer to a different context).
    """
    if role not in config.agent_roles:
        raise ValueError(f"role {role!r} does not speak in mode {config.mode!r}; roles: {config.agent_roles}")
    if not trajectories:
        raise ValueError("build_role_sequences needs at least one trajectory")
    prompt_set = config.prompts
    rows = []
    for tr in trajectories:
        if not tr.done:
            raise ValueError(f"trajectory (question {tr.question_index}, sample {tr.sample_index}) is still running")
        own = [i for i, t in enumerate(tr.turns) if t.role == role and not t.is_dummy]
        if own:
            enc = encoder.encode(role_view(tr, role, prompt_set, upto=own[-1] + 1), add_generation_prompt=False)
            turns = [tr.turns[i] for i in own]
        else:
            upto = 1 if role == RA else 0
            enc = encoder.encode(role_view(tr, role, prompt_set, upto=upto), add_generation_prompt=True)
            turns = []
        ids = enc.token_ids
        for t, (start, _) in zip(turns, enc.generated_spans):
            if t.prompt_len != start or hash(tuple(ids[:start])) != t.prompt_hash:
                raise ValueError(
                    f"{role} turn {t.turn} of trajectory (question {tr.question_index}, sample "
                    f"{tr.sample_index}): the prompt it was sampled from ({t.prompt_len} tokens) is not a "
                    "prefix of its training sequence; the chat template is not prefix-stable"
                )
        rows.append((ids, enc, turns))

    longest = max(len(ids) for ids, _, _ in rows)
    if pad_to is not None:
        if longest > pad_to:
            raise ValueError(f"{role} sequence of {longest} tokens does not fit pad_to={pad_to}")
        length = pad_to
    else:
        length = bucket_length(longest, bucket)
    if pad_id is None:
        pad_id = encoder.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = min(encoder.eos_ids)

    n = len(rows)
    tokens = np.full((n, length), pad_id, np.int32)
    loss_mask = np.zeros((n, length), np.float32)
    turn_ids = np.full((n, length), -1, np.int32)
    logprobs = np.zeros((n, length), np.float32)
    eos_label = np.zeros((n, length), np.float32)
    attention = np.zeros((n, length), np.int32)
    for r, (ids, enc, turns) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        attention[r, : len(ids)] = 1
        for t, (start, end), eos_pos in zip(turns, enc.generated_spans, enc.eos_label_positions):
            loss_mask[r, start:end] = 1.0
            turn_ids[r, start:end] = t.turn
            logprobs[r, start:end] = t.logprobs
            if eos_pos is not None and config.label_eos_after_stop_string:
                loss_mask[r, eos_pos] = 1.0
                turn_ids[r, eos_pos] = t.turn
                eos_label[r, eos_pos] = 1.0
    return RoleSequences(
        role=role,
        tokens=tokens,
        loss_mask=loss_mask,
        turn_ids=turn_ids,
        behaviour_logprobs=logprobs,
        eos_label_mask=eos_label,
        attention_mask=attention,
        group_ids=np.array([tr.question_index for tr in trajectories], np.int32),
        sample_ids=np.array([tr.sample_index for tr in trajectories], np.int32),
        num_turns=np.array([len(t) for _, _, t in rows], np.int32),
        rewards=np.zeros((n,), np.float32),
    )
