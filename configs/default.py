"""The embedded default: the paper's bootstrap on SmolLM2-135M-Instruct, as one job.

  1. greedy held-out accuracy of the base model (48 questions: 6 per family × level);
  2. SFT warm start of both agents (LoRA) on built-in worked examples: the meta-thinking agent on
     question → plan, the reasoning agent on (question, plan) → solution;
  3. single-turn ReMA RL from those adapters (alternating RA / MTA phases, the paper's rewards,
     GRPO), with the held-out evaluation after SFT (RL step 0) and after RL.

Sized for a 2-core CPU (the README quotes the measured time). Writes ``summary.json`` with
``heldout_accuracy = {base, sft, rl}`` and ``bootstrap.png`` under the workdir.

    python launch/train.py --config=configs/default.py --workdir=runs/default
    python launch/train.py --config=configs/default.py --config.rl.loop.steps=4 --workdir=/tmp/r

RL from the base model without the warm start is ``configs/rl_from_base.py``.
"""

import ml_collections

from configs import rema_from_sft, sft_default  # noqa: F401  (resolved by launch/*.py's sys.path)


def get_config() -> ml_collections.ConfigDict:
    rl = rema_from_sft.get_config()
    rl.data.test_per_cell = 6  # 4 families × 2 levels × 6 = 48 held-out questions
    rl.loop.eval_questions = 48
    rl.loop.eval_every = 0
    # Host memory (the README quotes the measured peak): the held-out questions go to the sampler 16 at a
    # time (a third of the 48-row KV cache and prefill), and each phase drops the previous phase's
    # compiled update / log-prob programs (~12 MiB of host RAM per decoder layer each on XLA:CPU).
    rl.loop.eval_batch_size = 16
    rl.memory.release_programs = "phase"
    # One column block per fused kernel (not auto's 2): with 2 the RL stage's rollouts were ~14% faster
    # but its peak was 4256 MiB (4528 in a second run) against 3871 with 1 (2026-12-06, 74c0cd6;
    # run-to-run spread ~300 MiB), and this job must stay under 4 GiB.
    rl.model.sampler_column_blocks = 1
    rl.loop.steps = 4  # one RA phase, then one MTA phase (2 steps each), to keep the job near 15 min
    # 2 questions × 4 plans × 2 solutions: the same 8 MTA / 16 RA rows per step as 4 × 2 × 2, but GRPO
    # groups of 4 plans (8 solutions) per question, so fewer groups have all-equal rewards (with 2
    # plans, 56% of the MTA's groups had zero reward variance after SFT).
    rl.rollout.num_samples = 4
    rl.loop.questions_per_step = 2
    sft = sft_default.get_config()
    sft.loop.max_seq_len = 320  # the longest worked conversation is 286 tokens: no padding to 384
    sft.data.test_per_cell = rl.data.test_per_cell
    sft.eval.questions = 0  # the bootstrap evaluates base / SFT / RL itself, on the same questions
    c = ml_collections.ConfigDict()
    c.sft = sft
    c.rl = rl
    c.heldout_questions = 48
    return c
