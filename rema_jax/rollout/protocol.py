"""The ReMA rollout protocols (VRP, MRP, single-turn and multi-turn MAMRP) as one state machine.

Every mode is a sequence of agent turns over a batch of trajectories. Each turn, for each agent in
order, the live trajectories' views are encoded (sampled ids spliced in, see ``chat.py``), checked
against the conversation-length limit, and sent to the policy in ONE call; the answers are
appended and the multi-turn rules applied (spec §1.3, official ``vllm_rollout_spmd.py``):

1. prompt longer than ``max_prompt_len`` (untruncated) -> ``conversation_too_long``; an empty dummy
   reasoning message is appended when it was the reasoning agent's turn; on the very first
   meta-thinking turn this is a configuration error and raises;
2. ``[FINISH]`` is a stop string for both agents; it stays in the meta-thinking text and is removed
   (then ``rstrip``) from the reasoning text;
3. after the reasoning agent answers a meta-thinking message containing ``[FINISH]``: ``finished``;
4. with ``stop_when_truncated``, a turn that hit ``max_new_tokens`` ends the trajectory as
   ``truncated`` (overriding 3, as the official code does; a dummy reasoning message follows a
   truncated meta-thinking turn);
5. still open after ``max_turns`` rounds: ``out_of_turns``.

Single-turn modes (VRP, MRP, single-turn MAMRP) play one round with no stop string and end
``finished``, or ``truncated`` if any turn hit the token limit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from rema_jax.rollout import prompts as prompts_lib
from rema_jax.rollout.chat import ChatEncoder, GeneratedMessage, Message, TextMessage
from rema_jax.rollout.types import (
    CONVERSATION_TOO_LONG,
    FINISHED,
    OUT_OF_TURNS,
    TRUNCATED,
    TURN_DUMMY,
    Policy,
    Trajectory,
    Turn,
    check_generations,
)
from rema_jax.sampling import SamplingParams

MTA = prompts_lib.META_THINKING
RA = prompts_lib.REASONING
SINGLE = prompts_lib.SINGLE


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """What to roll out and how.

    Attributes:
      mode: ``"vrp"``, ``"mrp"``, ``"single_turn"`` (MAMRP) or ``"multi_turn"`` (MAMRP).
      prompt_variant: ``"paper"`` or ``"code"``; None = the mode's default (paper for single-turn
        modes, code for multi-turn).
      task: ``"math"`` or ``"judge"`` (judge: single-turn MAMRP only).
      num_samples: ``n`` trajectories per question (interleaved: q0,q0,..,q1,q1,..).
      max_turns: rounds of MTA-then-RA (multi-turn only; single-turn modes play one).
      max_new_tokens: per-turn generation limit.
      max_prompt_len: limit on the conversation fed to an agent, in prompt tokens.
      stop_when_truncated: any turn hitting ``max_new_tokens`` ends the trajectory (multi-turn).
      temperature, top_k, top_p, greedy: sampling controls (``SamplingParams``).
      eos_ids: stop ids; None = the tokenizer's EOS.
      label_eos_after_stop_string: train on the template's end-of-turn EOS after a turn that stopped
        on ``[FINISH]`` (as the official code does), with behaviour log-prob 0.0 flagged in
        ``RoleSequences.eos_label_mask``.
    """

    mode: prompts_lib.Mode = "multi_turn"
    prompt_variant: prompts_lib.Variant | None = None
    task: prompts_lib.TaskKind = "math"
    num_samples: int = 1
    max_turns: int = 30
    max_new_tokens: int = 512
    max_prompt_len: int = 4096
    stop_when_truncated: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] | None = None
    label_eos_after_stop_string: bool = True

    def __post_init__(self):
        prompts_lib.get_prompts(self.mode, self.prompt_variant, self.task)  # validates the triple
        for name in ("num_samples", "max_turns", "max_new_tokens", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"RolloutConfig.temperature must be > 0 unless greedy, got {self.temperature}")

    @property
    def prompts(self) -> prompts_lib.PromptSet:
        return prompts_lib.get_prompts(self.mode, self.prompt_variant, self.task)

    @property
    def multi_turn(self) -> bool:
        return self.mode == "multi_turn"

    @property
    def agent_roles(self) -> tuple[str, ...]:
        return (SINGLE,) if self.mode in ("vrp", "mrp") else (MTA, RA)

    @property
    def rounds(self) -> int:
        return self.max_turns if self.multi_turn else 1

    def sampling_params(self) -> SamplingParams:
        flag = self.prompts.finish_flag if self.multi_turn else None
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            greedy=self.greedy,
            stop_strings=(flag,) if flag else (),
            eos_ids=self.eos_ids,
        )


def as_question_fields(question: str | Mapping[str, str]) -> dict[str, str]:
    """``"text"`` -> ``{"question": "text"}``; mappings (judge fields) are copied."""
    if isinstance(question, str):
        return {"question": question}
    if "question" not in question:
        raise ValueError(f"question mapping needs a 'question' field, got {sorted(question)}")
    return dict(question)


def role_view(
    traj: Trajectory, role: str, prompt_set: prompts_lib.PromptSet, *, upto: int | None = None
) -> list[Message]:
    """The chat as ``role`` sees it, built from the first ``upto`` turns of ``traj``.

    * ``single``: ``[system, user=template(q)] + [assistant=own]``;
    * meta-thinking: ``[system, user=template(q), (assistant=MTA_t, user=RA_t)*]``;
    * reasoning: ``[system, user=template(q, m_0), (assistant=RA_t, user=MTA_{t+1})*]``.

    Own turns are ``GeneratedMessage`` (sampled ids); the other agent's are ``TextMessage``.
    Dummy turns are never part of a view (they only ever end a trajectory).
    """
    turns = [t for t in traj.turns[:upto] if not t.is_dummy]
    rp = prompt_set[role]
    if role == RA:
        if not turns or turns[0].role != MTA:
            raise ValueError("the reasoning agent's view needs the meta-thinking agent's first message")
        msgs: list[Message] = [
            TextMessage("system", rp.system),
            TextMessage("user", rp.user(traj.question, turns[0].text)),
        ]
        turns = turns[1:]
    else:
        msgs = [TextMessage("system", rp.system), TextMessage("user", rp.user(traj.question))]
    for t in turns:
        if t.role == role:
            msgs.append(GeneratedMessage(t.token_ids, stopped=t.stop_reason == "stop"))
        else:
            msgs.append(TextMessage("user", t.text))
    return msgs


def _prompt_hash(ids: Sequence[int]) -> int:
    return hash(tuple(ids))


def run_rollout(
    policy: Policy, encoder: ChatEncoder, questions: Sequence[str | Mapping[str, str]], config: RolloutConfig
) -> list[Trajectory]:
    """Rolls out ``config.num_samples`` trajectories per question; returns them in interleaved order.

    Trajectory ``i`` answers question ``i // n`` (sample ``i % n``). One policy call per agent per
    round, over all live trajectories.
    """
    if not questions:
        raise ValueError("run_rollout needs at least one question")
    prompt_set = config.prompts
    flag = prompt_set.finish_flag if config.multi_turn else None
    sampling = config.sampling_params()
    n = config.num_samples
    trajs = [Trajectory(qi, s, as_question_fields(q)) for qi, q in enumerate(questions) for s in range(n)]

    for rnd in range(config.rounds):
        for role in config.agent_roles:
            live = [tr for tr in trajs if not tr.done]
            if not live:
                break
            batch, batch_prompts = [], []
            for tr in live:
                ids = encoder.encode(role_view(tr, role, prompt_set), add_generation_prompt=True).token_ids
                if len(ids) > config.max_prompt_len:
                    if rnd == 0 and role != RA:
                        raise RuntimeError(
                            f"question {tr.question_index}: the first {role} prompt is {len(ids)} tokens, over "
                            f"max_prompt_len={config.max_prompt_len}; raise the limit or shorten the question"
                        )
                    if role == RA:
                        tr.turns.append(_dummy(rnd))
                    tr.finish_reason = CONVERSATION_TOO_LONG
                    continue
                batch.append(tr)
                batch_prompts.append(ids)
            if not batch:
                continue
            gens = policy(role, batch_prompts, sampling)
            check_generations(role, gens, len(batch_prompts))
            for tr, ids, g in zip(batch, batch_prompts, gens):
                text = g.text
                if role == RA and flag:
                    text = text.replace(flag, "").rstrip()
                tr.turns.append(
                    Turn(
                        role,
                        rnd,
                        text,
                        tuple(int(x) for x in g.token_ids),
                        tuple(float(x) for x in g.logprobs),
                        g.finish_reason,
                        len(ids),
                        _prompt_hash(ids),
                    )
                )
                if not config.multi_turn:
                    if role == config.agent_roles[-1]:
                        tr.finish_reason = TRUNCATED if any(t.truncated for t in tr.turns) else FINISHED
                    elif g.finish_reason == "length" and config.stop_when_truncated:
                        tr.turns.append(_dummy(rnd))
                        tr.finish_reason = TRUNCATED
                    continue
                if role == RA and flag in tr.turns[-2].text:
                    tr.finish_reason = FINISHED
                if config.stop_when_truncated and g.finish_reason == "length":
                    if role == MTA:
                        tr.turns.append(_dummy(rnd))
                    tr.finish_reason = TRUNCATED
    for tr in trajs:
        if not tr.done:
            tr.finish_reason = OUT_OF_TURNS
    return trajs


def _dummy(rnd: int) -> Turn:
    return Turn(RA, rnd, "", (), (), TURN_DUMMY)


def prefix_reuse_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """How much of each prompt is the previous prompt of the same agent plus its own last output.

    Under splicing, turn ``t``'s prompt extends turn ``t-1``'s prompt + sampled ids, so a KV cache
    kept per (trajectory, agent) would only need to prefill the rest. Returns total prompt tokens,
    the reusable part and its fraction (what prefix caching could save in prefill).
    """
    total = reusable = 0
    for tr in trajectories:
        last: dict[str, Turn] = {}
        for t in tr.turns:
            if t.is_dummy:
                continue
            total += t.prompt_len
            if t.role in last:
                prev = last[t.role]
                reusable += prev.prompt_len + len(prev.token_ids)
            last[t.role] = t
    return {
        "prompt_tokens": float(total),
        "reusable_prefix_tokens": float(reusable),
        "reusable_fraction": reusable / total if total else 0.0,
    }
