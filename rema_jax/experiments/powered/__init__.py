"""The powered experiment (issue 11, part 2): ReMA vs VRP_RL from SFTs of the same budget, several
RL seeds, 95% bootstrap CIs, and the mechanism evidence (does the MTA learn plans that help the RA?).

Stages (each under ``workdir``, each resumable; ``stages.json``, written atomically, records the
finished ones, so a re-run skips them and a killed run continues where it stopped):

  ``VRP_base``            (optional) greedy held-out accuracy of the untrained model, VRP prompt;
  ``<SFT>``               ``sft.train.run_sft`` on the built-in worked examples (``SFT_VRP``,
                          ``SFT_ReMA``), once each, shared by every seed;
  ``<SFT>_eval``          greedy held-out accuracy of the SFT adapters under the RL protocol = every
                          RL run's step 0 (greedy decoding does not depend on the RL seed), once;
  ``<method>/seed<k>``    ``trainer.train`` from the SFT adapters with ``loop.seed = k``; resumes
                          mid-way from its own checkpoints. Held-out evals at every phase boundary
                          of the alternating schedule (``loop.eval_every`` = the gcd of the
                          boundaries) and at the end.

RL stages run seed-major (seed 0 of every method, then seed 1, ...) so that stopping early leaves
complete, paired seed groups. With ``time_budget_min`` a seed group that would not finish within
the budget (elapsed stage time + the predicted time of its stages, predicted from the measured
times of finished stages, else ``CostModel``) is not started: fewer seeds, never fewer questions,
and the report says so.

The report (``report()``) reads per-question correctness from the eval JSONL files: each method's
mean over seeds with a 95% CI from the two-level bootstrap over seeds and questions
(``rema_jax.eval.stats``), the paired differences (``ReMA − VRP_RL`` first), the per-family table
in the paper's Table-1 layout, the per (family, level) table, and the mechanism table: for each
meta-thinking phase (the reasoning agent frozen), the held-out success rate of the RA given the
MTA's plans at the phase start vs the phase end (greedy), per seed and averaged, with a paired CI.

Modules, in the order the data flows: ``config.py`` (``PoweredConfig``, ``load_powered_config``) →
``stages.py`` (the stage list, each run's config, the schedule's evaluation steps) → ``timeplan.py``
(time estimates, the seeds within the budget, ``format_plan``) → ``runner.py`` (``run_powered``: runs or
resumes the stages; the stage bodies are ``bodies.py``, which tests replace) → ``analysis.py``
(``report``: statistics, tables, the mechanism table) → ``markdown.py`` and ``plots.py`` (its files).
"""

from rema_jax.experiments.powered.analysis import ReportWriteError, report
from rema_jax.experiments.powered.config import (
    RESULTS_STEM,
    STAGES_FILE,
    CostModel,
    PoweredConfig,
    load_powered_config,
)
from rema_jax.experiments.powered.runner import run_powered
from rema_jax.experiments.powered.stages import (
    PhaseSpan,
    Stage,
    branch_step,
    eval_config,
    eval_steps,
    mechanism_eval_every,
    phase_spans,
    roles_rewarded_differently,
    run_config,
    sft_agent_steps,
    sft_label,
    stage_config,
    stage_list,
)
from rema_jax.experiments.powered.timeplan import (
    SAMPLER_BATCH_BUCKETS,
    eval_rows,
    format_plan,
    measured_costs,
    plan,
    seeds_within_budget,
)
from rema_jax.experiments.records import StageError
from rema_jax.rollout import META_THINKING, REASONING

__all__ = [
    "META_THINKING",
    "REASONING",
    "RESULTS_STEM",
    "SAMPLER_BATCH_BUCKETS",
    "STAGES_FILE",
    "CostModel",
    "PhaseSpan",
    "PoweredConfig",
    "ReportWriteError",
    "Stage",
    "StageError",
    "eval_config",
    "eval_rows",
    "eval_steps",
    "format_plan",
    "load_powered_config",
    "measured_costs",
    "mechanism_eval_every",
    "phase_spans",
    "plan",
    "report",
    "run_config",
    "branch_step",
    "roles_rewarded_differently",
    "run_powered",
    "seeds_within_budget",
    "sft_agent_steps",
    "sft_label",
    "stage_config",
    "stage_list",
]
