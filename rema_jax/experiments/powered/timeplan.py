"""The time plan: predicted minutes per stage (recorded, measured from finished stages, or the
``CostModel``), the seed groups that fit ``time_budget_min``, and the printed plan (``--plan``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from rema_jax.experiments.powered.config import CostModel, PoweredConfig
from rema_jax.experiments.powered.stages import (
    Stage,
    branch_step,
    eval_steps,
    phase_spans,
    run_config,
    sft_agent_steps,
    stage_list,
)
from rema_jax.rollout import META_THINKING

# The sampler's default batch buckets (rema_jax.sampling.Sampler): a held-out evaluation of n
# questions runs as one batch padded to the next bucket (chunks of the largest), so it costs
# ``eval_rows(n)`` rows: 120 questions cost as much as 128.
SAMPLER_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def eval_rows(questions: int) -> int:
    """Sampler rows (padding included) of a greedy evaluation of ``questions`` questions."""
    top = SAMPLER_BATCH_BUCKETS[-1]
    full, rest = divmod(questions, top)
    return full * top + (next(b for b in SAMPLER_BATCH_BUCKETS if b >= rest) if rest else 0)


def _stage_formula(cfg: PoweredConfig, stage: Stage, costs: CostModel) -> tuple[float, str]:
    q = cfg.heldout_questions
    rows = eval_rows(q)
    if stage.kind == "sft":
        n = sft_agent_steps(cfg.sft[stage.sft])
        return (
            n * costs.sft_step_s + costs.stage_overhead_s,
            f"{n} agent-steps × {costs.sft_step_s:.1f} s + {costs.stage_overhead_s:.0f} s",
        )
    if stage.kind in ("sft_eval", "base_eval"):
        return (
            rows * costs.eval_row_s + costs.stage_overhead_s,
            f"{q} questions ({rows} rows) × {costs.eval_row_s:.2f} s + {costs.stage_overhead_s:.0f} s",
        )
    rl = run_config(cfg, stage.method, stage.seed, None)
    first = branch_step(cfg, stage.method) if stage.method in cfg.branches else 0  # shared steps are not rerun
    steps = rl.loop.steps - first
    n_eval = len([s for s in eval_steps(rl) if s > first])
    return (
        steps * costs.rl_step_s + n_eval * rows * costs.eval_row_s + costs.stage_overhead_s,
        f"{steps} steps × {costs.rl_step_s:.0f} s + {n_eval} eval(s) × {rows} rows × "
        f"{costs.eval_row_s:.2f} s + {costs.stage_overhead_s:.0f} s"
        + (f" (steps 0–{first} shared with {cfg.branches[stage.method]})" if first else ""),
    )


def measured_costs(cfg: PoweredConfig, done: Mapping[str, Any]) -> CostModel:
    """``cfg.costs`` with the per-unit costs measured by finished stages where there are any."""
    c = cfg.costs
    changes: dict[str, float] = {}
    sft = [(r["seconds"], r["agent_steps"]) for n, r in done.items() if n in cfg.sft and r.get("agent_steps")]
    if sft:
        changes["sft_step_s"] = max(sum(max(s - c.stage_overhead_s, 0) for s, _ in sft) / sum(n for _, n in sft), 0.0)
    ev = [r["seconds"] for n, r in done.items() if n.endswith("_eval") or n == "VRP_base"]
    if ev:
        changes["eval_row_s"] = max(np.mean(ev) - c.stage_overhead_s, 0.0) / eval_rows(cfg.heldout_questions)
    steps = [r["step_s_median"] for r in done.values() if r.get("step_s_median")]
    if steps:
        changes["rl_step_s"] = float(np.mean(steps))
    return dataclasses.replace(c, **changes)


def plan(cfg: PoweredConfig, done: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per stage: status (``done`` / ``todo``), predicted minutes and their basis: the recorded time
    when done; a finished run of the same method (same config) when there is one; else the cost
    model, with per-unit costs measured by finished stages where available."""
    costs = measured_costs(cfg, done)
    measured = "measured" if costs != cfg.costs else "estimate"
    rows = []
    for st in stage_list(cfg):
        if st.name in done:
            rows.append(
                {
                    "stage": st.name,
                    "status": "done",
                    "minutes": done[st.name]["seconds"] / 60,
                    "basis": "recorded",
                    "seed": st.seed,
                }
            )
            continue
        same = [r["seconds"] for n, r in done.items() if st.kind == "rl" and r.get("method") == st.method]
        if same:
            rows.append(
                {
                    "stage": st.name,
                    "status": "todo",
                    "minutes": float(np.mean(same)) / 60,
                    "basis": f"measured: finished {st.method} run(s)",
                    "seed": st.seed,
                }
            )
            continue
        secs, basis = _stage_formula(cfg, st, costs)
        rows.append(
            {"stage": st.name, "status": "todo", "minutes": secs / 60, "basis": f"{measured}: {basis}", "seed": st.seed}
        )
    return rows


def seeds_within_budget(
    cfg: PoweredConfig, rows: Sequence[Mapping[str, Any]], done: Mapping[str, Any]
) -> tuple[list[int], float]:
    """The seed groups that fit the budget, in order (the first always runs), and the predicted total
    minutes of the stages that will run (recorded + predicted)."""
    total = sum(r["minutes"] for r in rows if r["seed"] is None)
    total += sum(v for k, v in done.get("_partial", {}).items()) / 60
    keep = []
    for seed in cfg.seeds:
        cost = sum(r["minutes"] for r in rows if r["seed"] == seed)
        if keep and cfg.time_budget_min and total + cost > cfg.time_budget_min:
            break
        keep.append(seed)
        total += cost
    return keep, total


def format_plan(cfg: PoweredConfig, done: Mapping[str, Any]) -> str:
    """The printed plan: the methods and their evaluation steps, then one line per stage (status,
    predicted minutes, basis) and the total against the budget."""
    rows = plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")})
    keep, total = seeds_within_budget(cfg, rows, done)
    rl0 = run_config(cfg, next(iter(cfg.rl)), cfg.seeds[0], None)
    lines = [
        f"powered experiment: {len(cfg.rl)} methods ({', '.join(cfg.rl)}) × seeds {list(cfg.seeds)}, "
        f"{cfg.heldout_questions} held-out questions, RL {rl0.loop.steps} steps per run"
    ]
    for m, c in cfg.rl.items():
        r = run_config(cfg, m, cfg.seeds[0], None)
        mta = [s for s in phase_spans(r) if s.trained == (META_THINKING,)]
        lines.append(
            f"  {m:<18} from {cfg.warm_start[m]}; held-out evals at steps {eval_steps(r)}"
            + (f"; MTA phases {[(s.start, s.end) for s in mta]}" if mta else "")
            + (
                f"; starts from {cfg.branches[m]}'s checkpoint at step {branch_step(cfg, m)} (same run until then)"
                if m in cfg.branches
                else ""
            )
        )
    width = max(len(r["stage"]) for r in rows)
    lines.append(f"  {'stage'.ljust(width)}  status  minutes  basis")
    for r in rows:
        skip = r["seed"] is not None and r["seed"] not in keep
        status = "skip" if skip else r["status"]
        lines.append(f"  {r['stage'].ljust(width)}  {status:<6}  {r['minutes']:7.1f}  {r['basis']}")
    budget = cfg.time_budget_min
    lines.append(
        f"  {'total'.ljust(width)}          {total:7.1f}  "
        + (
            f"budget {budget:.0f} min: "
            + (
                "all seeds fit"
                if len(keep) == len(cfg.seeds)
                else f"seeds {[s for s in cfg.seeds if s not in keep]} do not fit and are skipped"
            )
            if budget
            else "no time budget"
        )
    )
    return "\n".join(lines)
