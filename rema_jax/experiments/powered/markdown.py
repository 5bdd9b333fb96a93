"""``powered_experiment.md``: the report's tables and readings as markdown, from the report's JSON."""

from __future__ import annotations

import os
from typing import Any, Mapping

from rema_jax.eval.stats import Interval


def _fmt(d: Mapping[str, Any], signed: bool = False) -> str:
    """An ``Interval.as_dict()`` as ``est [low, high]`` (one decimal)."""
    return Interval(**d).format(signed=signed)


def report_markdown(out: Mapping[str, Any], table1: str, cell_table: str) -> str:
    """The whole report: readings, methods, paired differences, Table 1, per (family, level), runs,
    mechanism, plots and stage times."""
    L = [
        f"# {out['title']}",
        "",
        f"Date: {out['date']}. {out['model']}, built-in tasks ({', '.join(out['families'])}; levels "
        f"{', '.join(map(str, out['levels']))}), {out['heldout_questions']} held-out questions "
        f"(greedy decoding), RL {out['rl_steps']} steps per run, seeds {out['seeds']}"
        + (
            f" (planned {out['seeds_planned']}; {out['seeds_skipped']} skipped by the "
            f"{out['time_budget_min']:.0f}-min budget)"
            if out["seeds_skipped"]
            else ""
        )
        + f". Stage time {out['total_stage_minutes']:.1f} min.",
        "",
        f"95% CIs: {out['ci']['method']} ({out['ci']['n_boot']} replicates). Accuracy in %.",
        "",
    ]
    for child, b in out.get("branches", {}).items():
        L += [
            f"{child}'s runs are {b['from']}'s up to step {b['step']} (same seed): the first phases train only "
            f"roles whose reward the two share, so each {child} run resumes from {b['from']}'s checkpoint at "
            f"step {b['step']} with its evaluations up to that step; its minutes count the steps after.",
            "",
        ]
    L += [
        "## Reading",
        "",
    ]
    L += [f"- {r}" for r in out["readings"]]
    if out.get("hard_level"):
        L.append(f"- {out['hard_level']}")
    L += [
        "",
        "## Methods (mean over seeds)",
        "",
        "| method | SFT start | after RL: mean [95% CI] | RL − start [95% CI] |",
        "|---|---|---|---|",
    ]
    for m, r in out["methods"].items():
        L.append(f"| {m} | {_fmt(r['start'])} | {_fmt(r['final'])} | {_fmt(r['rl_minus_start'], True)} |")
    L += [
        "",
        "## Paired differences (seed i with seed i, question with question)",
        "",
        "| difference | mean [95% CI] | CI excludes 0 |",
        "|---|---|---|",
    ]
    for c in out["comparisons"]:
        d = c["difference"]
        L.append(f"| {c['a']} − {c['b']} | {_fmt(d, True)} | {'yes' if d['low'] > 0 or d['high'] < 0 else 'no'} |")
    L += [
        "",
        "## Table 1 layout (per family; RL columns: mean over seeds; deltas against the first column)",
        "",
        table1,
        "Per family, mean [95% CI]:",
        "",
        "| method | " + " | ".join(out["families"]) + " |",
        "|---|" + "---|" * len(out["families"]),
    ]
    for m, r in out["methods"].items():
        L.append(f"| {m} | " + " | ".join(_fmt(r["by_family"][f]) for f in out["families"]) + " |")
    L += [
        "",
        "## Per family and level",
        "",
        cell_table,
        "## Runs",
        "",
        "| method | seed | steps | held-out accuracy | low-level reward first → last | "
        "zero-variance groups | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        rw = (
            f"{r['reward_first']:+.3f} → {r['reward_last']:+.3f}"
            if r["reward_first"] is not None and r["reward_last"] is not None
            else "–"
        )
        zv = f"{100 * r['frac_zero_variance_groups']:.0f}%" if r["frac_zero_variance_groups"] is not None else "–"
        L.append(
            f"| {r['method']} | {r['seed']} | {r['steps']} | {r['accuracy']:.1f} | {rw} | {zv} | {r['minutes']:.1f} |"
        )
    L += [
        "",
        "## Mechanism: the RA's success given the MTA's plans, per phase",
        "",
        "Greedy held-out accuracy at each phase's start and end. In an MTA phase the RA is frozen (the same "
        "adapter throughout), so start → end measures plans that help (or hurt) the RA; RA phases "
        "(MTA frozen) are shown for contrast. Step 0 is the SFT evaluation. 'only trained' = every step of "
        "the phase, in every seed's metrics.jsonl, updated that agent alone.",
        "",
        "| method | phase | trained | only trained | steps | start mean [95% CI] | end mean [95% CI] | "
        "end − start [95% CI] | per seed (start → end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, mech in out["mechanism"].items():
        for p in mech["phases"]:
            seeds = ", ".join(f"s{x['seed']} {x['start']:.1f} → {x['end']:.1f}" for x in p["per_seed"])
            only = {True: "yes", False: "NO", None: "–"}[p["only_this_agent_updated"]]
            L.append(
                f"| {m} | {p['phase']} | {p['trained']} | {only} | {p['start']}→{p['end']} | "
                f"{_fmt(p['start_mean'])} | {_fmt(p['end_mean'])} | {_fmt(p['delta'], True)} | {seeds} |"
            )
        if mech["mta_pooled"]:
            p = mech["mta_pooled"]
            L.append(
                f"| {m} | all MTA | meta_thinking | | – | {_fmt(p['start_mean'])} | {_fmt(p['end_mean'])} | "
                f"{_fmt(p['delta'], True)} | |"
            )
    L += [
        "",
        f"![accuracy]({os.path.basename(out['files']['accuracy_png'])})",
        f"![mechanism]({os.path.basename(out['files']['mechanism_png'])})",
        "",
        "## Stage times (minutes)",
        "",
        "| stage | minutes |",
        "|---|---|",
    ]
    L += [f"| {k} | {v:.1f} |" for k, v in out["stage_minutes"].items()]
    return "\n".join(L) + "\n"
