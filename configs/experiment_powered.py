"""The powered experiment (issue 11, part 2): ReMA vs VRP_RL, each from an SFT of the same budget on the
same worked examples, 3 RL seeds, 96 held-out questions, 95% bootstrap CIs, and the mechanism evidence.

    python launch/experiment.py --preset=powered --workdir=runs/powered --plan   # stages + time estimate
    python launch/experiment.py --preset=powered --workdir=runs/powered          # run (resumable)

Design
  * data: built-in tasks, 4 families × levels 1, 2, 3, split_seed 0, train_per_cell 32,
    test_per_cell 8 → 96 held-out questions (24 per family, 8 per family × level). Level 3 (two-digit
    arithmetic, three-step word problems, a·x + b = c, a quadratic times a linear factor) is the
    harder level; the worked examples (rema_jax/sft/worked.py) re-solve every level-3 question
    (checked on all 480 questions of this split), so SFT covers it. Whether SFT leaves level 3 strictly
    between 0% and 100% is reported from the numbers (results: "Level 3 after SFT").
  * SFT, once per side, shared by all seeds: SFT_VRP (configs/sft_vrp.py: the single agent on the
    worked solutions) and SFT_ReMA (configs/sft_default.py: MTA plans + RA solutions), the same budget:
    4 worked examples per (family, level) cell = 48 per agent, 2 epochs of batch 4 = 24 steps per agent,
    LoRA rank 16, lr 1e-3. SFT and RL share the split, so SFT never sees a held-out question.
  * RL, per seed 0, 1, 2: VRP_RL (configs/vrp_rl_from_sft.py), ReMA and ReMA_consistency
    (configs/rema_from_sft.py, the latter with the consistency reward), 8 steps of 4 questions
    (VRP: 4 samples; ReMA: 2 plans × 2 solutions), lr 2e-5, GRPO. ReMA alternates 4 RA steps then 4 MTA
    steps (Algorithm 1), so each run has one MTA phase: steps 4 → 8, RA frozen.
  * evaluation: greedy, the 96 questions. Step 0 (after SFT) once per SFT (greedy decoding does not
    depend on the RL seed); ReMA runs also at step 4 (the MTA phase start = the RA phase end); every run
    at step 8. The mechanism table reads the MTA phase as step 4 → step 8.

Budget (2 shared CPU cores; costs measured before on this machine: SFT 16 steps per agent ≈ 3.5 min
→ 13.1 s per agent-step; one RL step ≈ 54 s at 4 questions × 4 samples; a 32-question greedy eval
≈ 1 min → 1.9 s per question; about 1 min per stage for model load and compiles):
    SFT_VRP           24 agent-steps × 13.1 s + 1 min                 =   6.2 min
    SFT_ReMA          48 agent-steps × 13.1 s + 1 min                 =  11.5 min
    SFT evals         2 × (96 × 1.9 s + 1 min)                        =   8.1 min
    VRP_RL  × 3       3 × (8 × 54 s + 1 eval × 96 × 1.9 s + 1 min)    =  33.7 min
    ReMA    × 3       3 × (8 × 54 s + 2 evals × 96 × 1.9 s + 1 min)   =  42.8 min
    ReMA_consistency  the same                                        =  42.8 min
    total                                                             ≈ 145 min  (< 150)
The margin is small. ``time_budget_min = 150``: before each seed group (seed-major order: seed k of
every method, then seed k+1) the runner re-predicts the remaining time from the *measured* times of the
finished stages and does not start a seed group that would end past 150 min: fewer seeds, never fewer
held-out questions, and the report says which seeds were skipped. ``--plan`` prints this estimate
(with measured costs once stages have finished). Each dropped seed group saves ≈ 40 min.
The untrained-model column (VRP, the paper's first Table-1 column) costs ≈ 4 min more: ``--base_eval``.
"""
import ml_collections

from configs import rema_from_sft, sft_default, sft_vrp, vrp_rl_from_sft  # noqa: F401

LEVELS = (1, 2, 3)
TEST_PER_CELL = 8      # 4 families × 3 levels × 8 = 96 held-out questions
RL_STEPS = 8
PHASE_STEPS = 4        # RA phase, then MTA phase: one MTA phase in 8 steps


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
    c.costs = dict(sft_step_s=13.1, rl_step_s=54.0, eval_question_s=1.9, stage_overhead_s=60.0)
    return c
