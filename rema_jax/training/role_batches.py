"""Experience → one batch per trained role → advantages: the "advantage" part of the data flow.

A step's ``Experience`` (graded trajectories, per-role rewards) becomes, for each trained role, a
``RoleBatch``: the rollout's ``RoleSequences`` (tokens, masks, behaviour log-probs, rewards, question
groups) and the ``TrainBatch`` the learner reads, whose old / reference log-probs and advantages the
step fills in.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from rema_jax import rl
from rema_jax.rl.batch import TrainBatch
from rema_jax.rollout import ChatEncoder, RolloutConfig, build_role_sequences
from rema_jax.rollout.types import RoleSequences
from rema_jax.training import experience as experience_lib


@dataclasses.dataclass
class RoleBatch:
    """One trained role's rows of a step.

    sequences: the rollout side, ``[B, T]`` / ``[B]`` (``rewards`` and ``group_ids`` filled in)
    train:     what the learner reads (with the sampler's behaviour log-probs); ``old_logprobs`` (unless the
               update takes them from its own forward) / ``ref_logprobs`` / ``advantages`` set by the step
    """

    sequences: RoleSequences
    train: TrainBatch


def build_role_batch(
    exp: experience_lib.Experience,
    role: str,
    encoder: ChatEncoder,
    rollout: RolloutConfig,
    solutions_per_plan: int,
    max_seq_len: int,
    max_loss_tokens: int,
) -> RoleBatch:
    """``role``'s rows of ``exp``, right-padded to ``max_seq_len``; refuses a row with more loss tokens
    than the log-prob kernel gathers (``max_loss_tokens``)."""
    rollout_k = dataclasses.replace(rollout, num_samples=rollout.num_samples * solutions_per_plan)
    seqs = build_role_sequences(exp.rows[role], encoder, rollout_k, role, pad_to=max_seq_len)
    seqs = dataclasses.replace(seqs, **{k: np.asarray(v) for k, v in seqs.as_dict().items()})
    most = int(seqs.loss_mask.sum(1).max())
    if most > max_loss_tokens:
        raise ValueError(
            f"{role}: a row has {most} loss tokens, more than the {max_loss_tokens} "
            "the log-prob kernel gathers (rollout.max_turns × (max_new_tokens + 1))"
        )
    seqs = dataclasses.replace(seqs, rewards=exp.rewards[role], group_ids=exp.group_ids[role])
    train = TrainBatch(
        tokens=seqs.tokens,
        attention_mask=seqs.attention_mask,
        loss_mask=seqs.loss_mask,
        turn_ids=seqs.turn_ids,
        # the update reports mean |behaviour − old| over the drawn loss tokens: how far the sampler's
        # numerics drift from the training graph (a forced end-of-turn label was not drawn)
        behaviour_logprobs=seqs.behaviour_logprobs.astype(np.float32),
        behaviour_mask=((seqs.loss_mask > 0) & (seqs.eos_label_mask == 0)).astype(np.float32),
    )
    return RoleBatch(sequences=seqs, train=train)


def step_advantages(config, batches: Mapping[str, RoleBatch]) -> dict[str, np.ndarray]:
    """Token advantages ``{role: [B, T]}`` of every role trained in one step.

    Multi-turn rollouts pass per-turn rewards (each row's outcome on its last turn,
    ``experience.outcome_turn_rewards``), so REINFORCE++ puts the turn-level return on the last
    token of every turn with returns reset between turns, as the official code; without them the
    outcome would sit on the last loss token only and every earlier turn would get return 0.
    With ``advantage.whiten_scope="batch"`` the roles' rows are one estimator call (REINFORCE++
    whitens them together like the official merged two-role batch; GRPO groups stay per
    (role, question) through ``role_ids_b``); ``"role"`` makes one call per role.
    """
    cfg = config.advantage
    inputs = {}
    for role, rb in batches.items():
        s, t = rb.sequences, rb.train
        x = {
            "rewards_b": s.rewards,
            "group_ids_b": s.group_ids,
            "loss_mask_bt": t.loss_mask,
            "turn_ids_bt": t.turn_ids,
            "old_logprobs_bt": t.old_logprobs,
            "ref_logprobs_bt": t.ref_logprobs,
        }
        if config.rollout.mode == "multi_turn":
            x["turn_rewards_bk"] = experience_lib.outcome_turn_rewards(
                s.rewards, t.turn_ids, t.loss_mask, config.loss.max_turns
            )
        inputs[role] = x
    if cfg.whiten_scope == "role" or len(inputs) < 2:
        return {role: np.asarray(rl.compute_advantages(cfg, **x)) for role, x in inputs.items()}
    roles = list(inputs)
    merged = {
        k: None if inputs[roles[0]][k] is None else np.concatenate([inputs[r][k] for r in roles])
        for k in inputs[roles[0]]
    }
    sizes = [len(inputs[r]["rewards_b"]) for r in roles]
    merged["role_ids_b"] = np.repeat(np.arange(len(roles)), sizes)
    adv = np.asarray(rl.compute_advantages(cfg, **merged))
    return dict(zip(roles, np.split(adv, np.cumsum(sizes)[:-1])))
