"""The powered experiment (issue 11, part 2): ReMA vs VRP_RL, each from an SFT of the same budget on the
same worked examples, 3 RL seeds, 120 held-out questions, 95% bootstrap CIs, and the mechanism evidence.

    python launch/experiment.py --preset=powered --workdir=runs/powered --plan   # stages + time estimate
    python launch/experiment.py --preset=powered --workdir=runs/powered          # run (resumable)

Design
  * data: built-in tasks, 4 families × levels 1, 2, 3, split_seed 0, train_per_cell 32,
    test_per_cell 10 → 120 held-out questions (30 per family, 10 per family × level). 120 rather than
    the issue's minimum of 96: an evaluation is one sampler batch padded to the next batch bucket
    (…, 64, 96, 128), so 120 questions cost as much as 128 and the extra questions are nearly free. Level 3 (two-digit arithmetic,
    three-step word problems, a·x + b = c, a quadratic times a linear factor) is the harder level;
    the worked examples (rema_jax/sft/worked.py) re-solve every level-3 question (checked on all 504
    questions of this split), so SFT covers it. Whether SFT leaves level 3 strictly between 0% and
    100% is not measured yet on the real model; the report states it from the numbers ("Level 3
    after SFT").
  * SFT, once per side, shared by all seeds: SFT_VRP (configs/sft_vrp.py: the single agent on the
    worked solutions) and SFT_ReMA (configs/sft_default.py: MTA plans + RA solutions), the same budget:
    4 worked examples per (family, level) cell = 48 per agent, 2 epochs of batch 4 = 24 steps per agent,
    LoRA rank 16, lr 1e-3. SFT and RL share the split, so SFT never sees a held-out question.
  * RL, per seed 0, 1, 2: VRP_RL (configs/vrp_rl_from_sft.py), ReMA and ReMA_consistency
    (configs/rema_from_sft.py, the latter with the consistency reward), 6 steps of 4 questions
    (VRP: 4 samples; ReMA: 2 plans × 2 solutions), lr 2e-5, GRPO. ReMA alternates 3 RA steps then 3 MTA
    steps (Algorithm 1): one MTA phase per run, steps 3 → 6, RA frozen.
  * evaluation: greedy, the 120 questions. Step 0 (after SFT) once per SFT (greedy decoding does not
    depend on the RL seed); ReMA runs also at step 3 (the MTA phase start = the RA phase end); every
    run at step 6. The mechanism table reads the MTA phase as step 3 → step 6.

Budget (2 shared CPU cores; costs measured before on this machine: SFT 16 steps per agent ≈ 3.5 min
→ 13.1 s per agent-step; one RL step ≈ 54 s at 4 questions × 4 samples; a 32-question greedy eval
≈ 1 min → 1.9 s per sampler row, an eval of 120 questions = 128 rows ≈ 4.1 min; about 1 min per
stage for model load and compiles):
    SFT_VRP           24 agent-steps × 13.1 s + 1 min                   =   6.2 min
    SFT_ReMA          48 agent-steps × 13.1 s + 1 min                   =  11.5 min
    SFT evals         2 × (128 rows × 1.9 s + 1 min)                    =  10.1 min
    VRP_RL  × 3       3 × (6 × 54 s + 1 eval × 128 × 1.9 s + 1 min)     =  31.4 min
    ReMA    × 3       3 × (6 × 54 s + 2 evals × 128 × 1.9 s + 1 min)    =  43.5 min
    ReMA_consistency  the same                                          =  43.5 min
    total                                                               ≈ 146 min  (< 150)
RL budget: 8 steps (phases of 4) with 3 seeds would take ≈ 162 min, so it does not fit; the issue's
order (fewer seeds before fewer questions) and its minimum of 3 seeds leave 6 steps × 3 seeds as the
largest RL budget that fits. The margin is small: ``time_budget_min = 150`` makes the runner re-predict
the remaining time from the *measured* times of finished stages before each seed group (seed-major
order: seed k of every method, then seed k+1) and not start a group that would end past 150 min —
fewer seeds, never fewer held-out questions, and the report says which seeds were skipped. ``--plan``
prints this estimate (with measured costs once stages have finished). One seed group ≈ 39 min.
The untrained-model column (VRP, the paper's first Table-1 column) costs ≈ 5 min more: ``--base_eval``.
"""

import ml_collections

from configs import rema_from_sft, sft_default, sft_vrp, vrp_rl_from_sft  # noqa: F401

LEVELS = (1, 2, 3)
TEST_PER_CELL = 10  # 4 families × 3 levels × 10 = 120 held-out questions (30 per family)
RL_STEPS = 6
PHASE_STEPS = 3  # RA phase (steps 0-2), then MTA phase (steps 3-5)


def _split(section):
    section.levels = LEVELS
    section.train_per_cell = 32
    section.test_per_cell = TEST_PER_CELL
    section.split_seed = 0


def get_config() -> ml_collections.ConfigDict:
    sft_r, sft_v = sft_default.get_config(), sft_vrp.get_config()
    for s in (sft_r, sft_v):
        _split(s.data)
        s.data.examples_per_cell = 4
        s.eval.questions = 0  # the experiment evaluates the SFT adapters itself, on the 96 questions
    vrp, rema, consistency = vrp_rl_from_sft.get_config(), rema_from_sft.get_config(), rema_from_sft.get_config()
    for r in (vrp, rema, consistency):
        _split(r.data)
        r.loop.steps = RL_STEPS
        r.loop.eval_questions = TEST_PER_CELL * 4 * len(LEVELS)
        r.checkpoint.keep_last = 2
    for r in (rema, consistency):
        r.schedule.reasoning_steps = PHASE_STEPS
        r.schedule.meta_thinking_steps = PHASE_STEPS
    consistency.reward = dict(kind="consistency")

    c = ml_collections.ConfigDict()
    c.sft = ml_collections.ConfigDict({"SFT_VRP": sft_v, "SFT_ReMA": sft_r})
    c.rl = ml_collections.ConfigDict({"VRP_RL": vrp, "ReMA": rema, "ReMA_consistency": consistency})
    c.methods = ("VRP_RL", "ReMA", "ReMA_consistency")  # the order of stages and tables
    c.warm_start = {"VRP_RL": "SFT_VRP", "ReMA": "SFT_ReMA", "ReMA_consistency": "SFT_ReMA"}
    c.seeds = 3
    c.heldout_questions = TEST_PER_CELL * 4 * len(LEVELS)
    c.base_eval = False
    c.time_budget_min = 150.0
    c.n_boot = 10_000
    c.comparisons = (("ReMA", "VRP_RL"), ("ReMA_consistency", "VRP_RL"), ("ReMA_consistency", "ReMA"))
    # the consistency reward changes only the MTA's reward, and the RA phase (steps 0-2) comes first:
    # ReMA_consistency/seed k is ReMA/seed k up to step 3 and resumes from its checkpoint there
    c.branches = {"ReMA_consistency": "ReMA"}
    c.costs = dict(sft_step_s=13.1, rl_step_s=54.0, eval_row_s=1.9, stage_overhead_s=60.0)
    return c
