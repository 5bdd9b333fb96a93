"""The powered experiment's report from the finished stages' eval files: per method the mean over seeds
with a 95% two-level bootstrap CI (``rema_jax.eval.stats``), the paired differences, the Table-1 and
(family, level) tables, and the mechanism table (the RA's success given the MTA's plans at each
phase's start vs end); written as ``powered_experiment.{md,json}`` and two plots."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from rema_jax.experiments.heldout import Questions
from rema_jax.experiments.powered.config import RESULTS_STEM, PoweredConfig
from rema_jax.experiments.powered.markdown import report_markdown
from rema_jax.experiments.powered.plots import plot_accuracy, plot_mechanism
from rema_jax.experiments.powered.stages import branch_step, eval_steps, phase_spans, run_config, sft_label
from rema_jax.experiments.records import write_json, write_text
from rema_jax.rollout import META_THINKING, REASONING, SINGLE
from rema_jax.training.config import TrainConfig


class ReportWriteError(Exception):
    """A report file that could not be written, with its path (the runner raises it as a ``StageError``)."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"{path}: {type(cause).__name__}: {cause}")
        self.path, self.cause = path, f"{type(cause).__name__}: {cause}"


def _pct(x: float) -> float:
    return 100.0 * float(x)


def report(
    cfg: PoweredConfig,
    workdir: str,
    results_dir: str,
    done: Mapping[str, Any],
    *,
    seeds: Sequence[int],
    wall_this_run_min: float = 0.0,
) -> dict[str, Any]:
    """Statistics, tables and plots from the finished stages; writes ``powered_experiment.{md,json}``,
    ``powered_accuracy.png`` and ``powered_mechanism.png`` under ``results_dir``."""
    from rema_jax.eval import stats
    from rema_jax.eval.table import markdown_table

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(workdir, p)

    boot = dict(n_boot=cfg.n_boot, seed=0)
    sft_names = list(cfg.sft)
    qs = Questions(resolve(done[f"{sft_names[0]}_eval"]["eval_file"]))
    families = sorted(set(qs.family))
    levels = sorted({lv for lv in qs.level if lv is not None})

    start = {s: qs.vector(resolve(done[f"{s}_eval"]["eval_file"])) for s in sft_names}
    base = qs.vector(resolve(done["VRP_base"]["eval_file"])) if "VRP_base" in done else None
    final: dict[str, np.ndarray] = {}
    runs = []
    for m in cfg.rl:
        rows = []
        for s in seeds:
            rec = done[f"{m}/seed{s}"]
            v = qs.vector(resolve(rec["eval_files"][str(rec["steps"])]))
            rows.append(v)
            role = SINGLE if cfg.rl[m].single_agent else REASONING
            diag = rec.get("diagnostics", {}).get(role, {})
            runs.append(
                {
                    "method": m,
                    "seed": s,
                    "steps": rec["steps"],
                    "accuracy": _pct(v.mean()),
                    "by_family": {f: _pct(v[qs.family == f].mean()) for f in families},
                    "reward_first": diag.get("reward_first"),
                    "reward_last": diag.get("reward_last"),
                    "frac_zero_variance_groups": diag.get("frac_zero_variance_groups"),
                    "minutes": rec["seconds"] / 60,
                    "resumed_from_step": rec.get("resumed_from_step"),
                }
            )
        final[m] = np.stack(rows)

    def ci(x, b=None):
        interval = stats.bootstrap_mean_ci(x, **boot) if b is None else stats.paired_difference_ci(x, b, **boot)
        return interval.scaled(100)

    methods = {}
    for m in cfg.rl:
        sft = cfg.warm_start[m]
        methods[m] = {
            "sft": sft,
            "start": ci(start[sft]).as_dict(),
            "final": ci(final[m]).as_dict(),
            "rl_minus_start": ci(final[m], start[sft]).as_dict(),
            "by_family": {f: ci(final[m][:, qs.family == f]).as_dict() for f in families},
        }
    starts = {
        sft_label(s): {
            "accuracy": ci(start[s]).as_dict(),
            "by_family": {f: ci(start[s][qs.family == f]).as_dict() for f in families},
        }
        for s in sft_names
    }
    comparisons = []
    for a, b in cfg.comparisons:
        d = ci(final[a], final[b])
        comparisons.append(
            {"a": a, "b": b, "difference": d.as_dict(), "reading": stats.reading(d, f"the paired difference {a} − {b}")}
        )

    # Table 1: rows = families + Average, columns = [VRP] + per SFT: its start, then its methods.
    columns: dict[str, dict[str, float]] = {}
    if base is not None:
        columns["VRP"] = {f: _pct(base[qs.family == f].mean()) for f in families}
    for s in sft_names:
        columns[sft_label(s)] = {f: _pct(start[s][qs.family == f].mean()) for f in families}
        for m in cfg.rl:
            if cfg.warm_start[m] == s:
                columns[m] = {f: _pct(final[m][:, qs.family == f].mean()) for f in families}
    table1 = markdown_table(columns, columns=list(columns), benchmarks=families, average=True, row_header="Task family")
    cells = [(f, lv) for f in families for lv in levels if ((qs.family == f) & (qs.level == lv)).any()]
    by_cell: dict[str, dict[str, float]] = {}
    vectors = {"VRP": base} if base is not None else {}
    for s in sft_names:
        vectors[sft_label(s)] = start[s]
        vectors.update({m: final[m] for m in cfg.rl if cfg.warm_start[m] == s})
    for col, v in vectors.items():
        v2 = np.atleast_2d(v)
        by_cell[col] = {f"{f} L{lv}": _pct(v2[:, (qs.family == f) & (qs.level == lv)].mean()) for f, lv in cells}
    cell_table = markdown_table(
        by_cell,
        columns=list(by_cell),
        benchmarks=[f"{f} L{lv}" for f, lv in cells],
        average=False,
        row_header="family, level",
    )
    hard = max(levels) if levels else None
    hard_line = None
    if hard is not None:
        at = {sft_label(s): _pct(start[s][qs.level == hard].mean()) for s in sft_names}
        verdict = (
            "neither 0% nor 100%: informative"
            if all(0 < v < 100 for v in at.values())
            else "at 0% or 100% for some start: this level cannot show a difference there"
        )
        hard_line = f"Level {hard} after SFT: " + ", ".join(f"{k} {v:.1f}%" for k, v in at.items()) + f" ({verdict})."

    mechanism = _mechanism(cfg, done, qs, start, seeds, ci, resolve)

    out = {
        "title": "Powered experiment: ReMA vs VRP_RL from SFTs of the same budget",
        "date": time.strftime("%Y-%m-%d"),
        "seeds": list(seeds),
        "seeds_planned": list(cfg.seeds),
        "seeds_skipped": [s for s in cfg.seeds if s not in seeds],
        "heldout_questions": len(qs.uids),
        "families": families,
        "levels": levels,
        "rl_steps": cfg.rl[next(iter(cfg.rl))].loop.steps,
        "decoding": "greedy",
        "model": _model_name(cfg.rl[next(iter(cfg.rl))]),
        "ci": {
            "level": 0.95,
            "method": "percentile bootstrap, two-level: seeds and questions resampled "
            "with replacement, one question resample shared by all seeds",
            "n_boot": cfg.n_boot,
        },
        "branches": {c: {"from": p, "step": branch_step(cfg, c)} for c, p in cfg.branches.items()},
        "runs": runs,
        "methods": methods,
        "sft_starts": starts,
        "comparisons": comparisons,
        "table1": columns,
        "by_family_level": by_cell,
        "hard_level": hard_line,
        "mechanism": mechanism,
        "base": ({"accuracy": ci(base).as_dict()} if base is not None else None),
        "stage_minutes": {k: v["seconds"] / 60 for k, v in done.items() if not k.startswith("_")},
        "total_stage_minutes": sum(v["seconds"] for k, v in done.items() if not k.startswith("_")) / 60,
        "time_budget_min": cfg.time_budget_min,
        "wall_this_invocation_min": wall_this_run_min,
        "sft": {
            s: {k: v for k, v in done[s].items() if k.endswith(("/loss_first", "/loss_last", "steps_per_agent"))}
            for s in sft_names
        },
    }
    readings = [c["reading"] for c in comparisons]
    for m, r in methods.items():
        d = stats.Interval(**r["rl_minus_start"])
        readings.append(stats.reading(d, f"{m} − its SFT start ({sft_label(r['sft'])})"))
    for m, mech in mechanism.items():
        for ph in mech["phases"]:
            if ph["trained"] == META_THINKING:
                d = stats.Interval(**ph["delta"])
                readings.append(
                    f"{m}, MTA phase {ph['phase']} (steps {ph['start']}→{ph['end']}, RA frozen): RA "
                    f"success given the MTA's plans {ph['start_mean']['estimate']:.1f} → "
                    f"{ph['end_mean']['estimate']:.1f}%; " + stats.reading(d, "end − start")
                )
    if out["seeds_skipped"]:
        readings.append(
            f"only {len(seeds)} of {len(cfg.seeds)} planned seeds finished within the "
            f"{cfg.time_budget_min:.0f}-min budget (seeds {out['seeds_skipped']} skipped): fewer seeds, "
            f"the same {len(qs.uids)} held-out questions"
        )
    out["readings"] = readings

    os.makedirs(results_dir, exist_ok=True)
    paths = {
        "md": os.path.join(results_dir, f"{RESULTS_STEM}.md"),
        "json": os.path.join(results_dir, f"{RESULTS_STEM}.json"),
        "accuracy_png": os.path.join(results_dir, "powered_accuracy.png"),
        "mechanism_png": os.path.join(results_dir, "powered_mechanism.png"),
    }
    out["files"] = paths
    for key, fn in (
        ("accuracy_png", lambda p: plot_accuracy(out, p)),
        ("mechanism_png", lambda p: plot_mechanism(out, p)),
        ("md", lambda p: write_text(p, report_markdown(out, table1, cell_table))),
        ("json", lambda p: write_json(p, out)),
    ):
        try:
            fn(paths[key])
        except Exception as e:  # noqa: BLE001 — named with the file, re-raised by the caller
            raise ReportWriteError(paths[key], e) from e
    print("\n" + "\n".join(readings), flush=True)
    return out


def _model_name(rl: TrainConfig) -> str:
    m = rl.model
    name = "SmolLM2-135M-Instruct" if m.source == "smollm2-135m" else m.source
    return name + (f" (random init {m.random_init})" if m.random_init else "")


def _mechanism(cfg, done, qs, start, seeds, ci, resolve) -> dict[str, Any]:
    """Per two-agent method: every phase of the schedule with held-out accuracy (greedy) at its start
    and end, per seed, and over seeds with CIs. In an MTA phase the RA is frozen, so start vs end is
    the RA's success given the MTA's plans before vs after the MTA trained."""
    out = {}
    for m, rl in cfg.rl.items():
        run0 = run_config(cfg, m, seeds[0], None)
        spans = phase_spans(run0)
        if len(spans) < 2:
            continue
        evaluated = set(eval_steps(run0)) | {0}

        def vec(seed, step):
            if step == 0:
                return start[cfg.warm_start[m]]
            rec = done[f"{m}/seed{seed}"]
            return qs.vector(resolve(rec["eval_files"][str(step)]))

        def trained_logged(sp):
            """From every seed's metrics.jsonl: did each step of the phase update only its agent(s)?
            None when the log does not say (no ``phase/trained`` records for those steps)."""
            seen = []
            for s in seeds:
                path = os.path.join(resolve(done[f"{m}/seed{s}"]["directory"]), "metrics.jsonl")
                if not os.path.exists(path):
                    return None
                with open(path, encoding="utf-8") as f:
                    recs = [json.loads(line) for line in f if line.strip()]
                seen += [
                    r.get("phase/trained")
                    for r in recs
                    if sp.start < r.get("step", -1) <= sp.end and "phase/trained" in r
                ]
            return None if not seen else all(t == "+".join(sp.trained) for t in seen)

        phases = []
        for sp in spans:
            if sp.start not in evaluated or sp.end not in evaluated:
                continue
            a = np.stack([vec(s, sp.start) for s in seeds])
            b = np.stack([vec(s, sp.end) for s in seeds])
            phases.append(
                {
                    "phase": sp.index,
                    "trained": "+".join(sp.trained),
                    "start": sp.start,
                    "end": sp.end,
                    "only_this_agent_updated": trained_logged(sp),
                    "per_seed": [
                        {
                            "seed": s,
                            "start": _pct(a[i].mean()),
                            "end": _pct(b[i].mean()),
                            "delta": _pct(b[i].mean() - a[i].mean()),
                        }
                        for i, s in enumerate(seeds)
                    ],
                    "start_mean": ci(a).as_dict(),
                    "end_mean": ci(b).as_dict(),
                    "delta": ci(b, a).as_dict(),
                }
            )
        mta = [p for p in phases if p["trained"] == META_THINKING]
        pooled = None
        if len(mta) > 1:  # all MTA phases: (phase, question) pairs as the units
            a = np.concatenate([np.stack([vec(s, p["start"]) for s in seeds]) for p in mta], axis=1)
            b = np.concatenate([np.stack([vec(s, p["end"]) for s in seeds]) for p in mta], axis=1)
            pooled = {"start_mean": ci(a).as_dict(), "end_mean": ci(b).as_dict(), "delta": ci(b, a).as_dict()}
        out[m] = {"reward": cfg.rl[m].reward.kind, "phases": phases, "mta_pooled": pooled}
    return out
