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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from rema_jax.config_utils import ConfigError, from_dict, to_dict
from rema_jax.errors import UserError
from rema_jax.sft.train import SFTConfig
from rema_jax.training.bootstrap import (BootstrapConfig, StageError, _read_json, _write_json,
                                         heldout_scores, rl_diagnostics)
from rema_jax.training.config import TrainConfig

META_THINKING, REASONING = "meta_thinking", "reasoning"
STAGES_FILE = "stages.json"
RESULTS_STEM = "powered_experiment"


# The sampler's default batch buckets (rema_jax.sampling.Sampler): a held-out evaluation of n
# questions runs as one batch padded to the next bucket (chunks of the largest), so it costs
# ``eval_rows(n)`` rows: 120 questions cost as much as 128.
SAMPLER_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def eval_rows(questions: int) -> int:
    """Sampler rows (padding included) of a greedy evaluation of ``questions`` questions."""
    top = SAMPLER_BATCH_BUCKETS[-1]
    full, rest = divmod(questions, top)
    return full * top + (next(b for b in SAMPLER_BATCH_BUCKETS if b >= rest) if rest else 0)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work on the target machine, for the plan before anything is measured
    (2 shared CPU cores, SmolLM2-135M): one SFT step of one agent (batch 4), one RL step
    (4 questions × 4 samples), one sampler row of a held-out evaluation (greedy; ``eval_rows``
    counts the padding of the batch bucket), and the fixed cost of a stage (model load, compiles)."""
    sft_step_s: float = 13.1
    rl_step_s: float = 54.0
    eval_row_s: float = 1.9
    stage_overhead_s: float = 60.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0")


@dataclasses.dataclass(frozen=True)
class PoweredConfig:
    """``sft``: SFT stage name → config; ``rl``: method → RL config (``loop.seed``,
    ``model.init_adapters_from`` and the eval settings are set per run); ``warm_start``: method →
    its SFT stage. ``comparisons``: (a, b) pairs reported as paired differences a − b, the first
    being the headline."""
    sft: Mapping[str, SFTConfig]
    rl: Mapping[str, TrainConfig]
    warm_start: Mapping[str, str]
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_questions: int = 96
    base_eval: bool = False
    time_budget_min: float = 150.0
    n_boot: int = 10_000
    comparisons: tuple[tuple[str, str], ...] = (("ReMA", "VRP_RL"),)
    costs: CostModel = CostModel()

    def __post_init__(self):
        if not self.rl or not self.sft:
            raise ValueError("needs at least one SFT stage and one RL method")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative ints, got {self.seeds}")
        if self.heldout_questions < 1 or self.n_boot < 100 or self.time_budget_min < 0:
            raise ValueError("heldout_questions >= 1, n_boot >= 100 and time_budget_min >= 0 (0: no budget)")
        if set(self.warm_start) != set(self.rl):
            raise ValueError(f"warm_start names {sorted(self.warm_start)}, the methods are {sorted(self.rl)}")
        unused = sorted(set(self.sft) - set(self.warm_start.values()))
        unknown = sorted(set(self.warm_start.values()) - set(self.sft))
        if unknown or unused:
            raise ValueError(f"warm_start: unknown SFT stage(s) {unknown}, unused SFT stage(s) {unused}")
        for a, b in self.comparisons:
            if a not in self.rl or b not in self.rl or a == b:
                raise ValueError(f"comparisons: ({a!r}, {b!r}) must name two different methods of {sorted(self.rl)}")
        # each method with its SFT: one model, one adapter layout, one split (bootstrap's checks)
        for method, rl in self.rl.items():
            try:
                BootstrapConfig(sft=self.sft[self.warm_start[method]], rl=rl,
                                heldout_questions=self.heldout_questions)
            except ValueError as e:
                raise ValueError(f"method {method} (from {self.warm_start[method]}): {e}") from None
        first = next(iter(self.rl))
        for method, rl in self.rl.items():  # every method: the same held-out questions and RL budget
            for section, names in (("data", ("source", "families", "levels", "train_per_cell",
                                             "test_per_cell", "split_seed")),
                                   ("model", ("source", "random_init", "dtype")),
                                   ("loop", ("steps", "questions_per_step")),
                                   ("optimizer", ("learning_rate",))):
                for name in names:
                    x, y = (getattr(getattr(c, section), name) for c in (self.rl[first], rl))
                    if x != y:
                        raise ValueError(f"rl.{method}.{section}.{name}={y!r} differs from rl.{first}: "
                                         f"{x!r}; the methods must share the held-out split and the RL budget")
        sft_first = next(iter(self.sft))
        for name, s in self.sft.items():  # every SFT: the same budget on the same worked examples
            for path in ("data.families", "data.levels", "data.train_per_cell", "data.examples_per_cell",
                         "data.split_seed", "loop.epochs", "loop.batch_size", "loop.seed", "optimizer"):
                x, y = (_get(c, path) for c in (self.sft[sft_first], s))
                if x != y:
                    raise ValueError(f"sft.{name}.{path}={y!r} differs from sft.{sft_first}: {x!r}; the "
                                     "SFT stages must have the same budget on the same worked examples")
        for sft_name in self.sft:  # one greedy step-0 eval per SFT serves all its methods
            methods = [m for m, s in self.warm_start.items() if s == sft_name]
            for m in methods[1:]:
                if self.rl[m].rollout != self.rl[methods[0]].rollout:
                    raise ValueError(f"rl.{m}.rollout differs from rl.{methods[0]}.rollout, but both start "
                                     f"from {sft_name}, whose held-out evaluation they share")
        if self.base_eval and not any(c.single_agent for c in self.rl.values()):
            raise ValueError("base_eval evaluates the untrained model with the VRP prompt: needs a "
                             "single-agent method")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_powered_config(raw: Any) -> PoweredConfig:
    """``ml_collections.ConfigDict`` / dict → validated ``PoweredConfig`` (``ConfigError`` naming the
    dotted path, e.g. ``config.rl.ReMA.loop.steps``)."""
    from rema_jax.sft.train import load_sft_config
    from rema_jax.training.config import load_train_config

    plain = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    fields = {f.name for f in dataclasses.fields(PoweredConfig)}
    unknown = sorted(set(plain) - fields - {"methods"})
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; valid keys: {sorted(fields | {'methods'})}")
    for key in ("sft", "rl", "warm_start"):
        if not isinstance(plain.get(key), Mapping):
            raise ConfigError(f"config.{key}: expected a mapping of names to configs")

    def load(fn, value, path):
        try:
            return fn(value)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config", path, 1)) from None

    # ConfigDict sorts its keys: ``methods`` gives the order (stages, tables); SFTs follow their methods
    order = list(plain.get("methods") or plain["rl"])
    if sorted(order) != sorted(plain["rl"]):
        raise ConfigError(f"config.methods={order} must list the methods of config.rl: {sorted(plain['rl'])}")
    sft_order = list(dict.fromkeys([plain["warm_start"].get(m) for m in order if m in plain["warm_start"]]
                                   + sorted(plain["sft"])))
    sft = {n: load(load_sft_config, plain["sft"][n], f"config.sft.{n}") for n in sft_order if n in plain["sft"]}
    rl = {n: load(load_train_config, plain["rl"][n], f"config.rl.{n}") for n in order}
    rest = {k: v for k, v in plain.items()
            if k not in ("sft", "rl", "warm_start", "seeds", "costs", "comparisons", "methods")}
    if "seeds" in plain:
        s = plain["seeds"]
        rest["seeds"] = tuple(range(s)) if isinstance(s, int) else tuple(s)
    if "comparisons" in plain:
        rest["comparisons"] = tuple(tuple(p) for p in plain["comparisons"])
    if "costs" in plain:
        rest["costs"] = from_dict(CostModel, plain["costs"], "config.costs")
    try:
        return PoweredConfig(sft=sft, rl=rl, warm_start=dict(plain["warm_start"]), **rest)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config: {e}") from None


# ----------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class PhaseSpan:
    index: int
    trained: tuple[str, ...]
    start: int  # first step of the phase (the policy *before* it = the checkpoint at `start`)
    end: int    # the checkpoint after its last step


def phase_spans(rl: TrainConfig) -> list[PhaseSpan]:
    """The schedule's phases over ``rl.loop.steps`` (one phase for single-agent or shared runs)."""
    from rema_jax.training.schedules import phase_at

    steps = rl.loop.steps
    if rl.single_agent or rl.adapter.kind == "shared" or rl.schedule.kind == "simultaneous":
        return [PhaseSpan(0, tuple(rl.rollout.agent_roles), 0, steps)]
    spans: list[PhaseSpan] = []
    for step in range(steps):
        p = phase_at(rl.schedule, step)
        if not spans or spans[-1].index != p.index:
            spans.append(PhaseSpan(p.index, p.trained, step, step + 1))
        else:
            spans[-1] = dataclasses.replace(spans[-1], end=step + 1)
    return spans


def mechanism_eval_every(rl: TrainConfig) -> int:
    """``loop.eval_every`` that puts a held-out evaluation on every phase boundary inside the run
    (the gcd of the boundaries; 0 when the run has one phase). With equal RA / MTA phase lengths P
    it is P: no evaluation off a boundary."""
    bounds = [s.start for s in phase_spans(rl) if 0 < s.start < rl.loop.steps]
    return math.gcd(*bounds) if bounds else 0


def eval_steps(rl: TrainConfig) -> list[int]:
    """The RL steps the trainer evaluates the held-out questions at (eval_before is off: step 0 is
    the SFT stage's evaluation)."""
    k, steps = rl.loop.eval_every, rl.loop.steps
    return sorted({s for s in range(k, steps, k)} | {steps}) if k else [steps]


# ----------------------------------------------------------------------------- stages
@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str              # "base_eval" | "sft" | "sft_eval" | "rl"
    directory: str         # relative to the workdir
    sft: str | None = None
    method: str | None = None
    seed: int | None = None


def sft_label(sft_name: str) -> str:
    """``SFT_VRP`` → ``VRP+SFT`` (the Table-1 column of the SFT starting point)."""
    return (sft_name[4:] if sft_name.startswith("SFT_") else sft_name) + "+SFT"


def stage_list(cfg: PoweredConfig) -> list[Stage]:
    out = []
    if cfg.base_eval:
        out.append(Stage("VRP_base", "base_eval", "VRP_base"))
    for name in cfg.sft:
        out.append(Stage(name, "sft", name, sft=name))
        out.append(Stage(f"{name}_eval", "sft_eval", f"{name}_eval", sft=name))
    for seed in cfg.seeds:
        for method in cfg.rl:
            out.append(Stage(f"{method}/seed{seed}", "rl", os.path.join(method, f"seed{seed}"),
                             sft=cfg.warm_start[method], method=method, seed=seed))
    return out


def run_config(cfg: PoweredConfig, method: str, seed: int, adapters: str | None) -> TrainConfig:
    """One RL run's config: the method's, from ``adapters``, with ``loop.seed = seed``, evals on the
    held-out questions at every phase boundary and the end (no step-0 eval: the SFT stage's)."""
    rl = cfg.rl[method]
    loop = dataclasses.replace(rl.loop, seed=seed, eval_before=False, eval_questions=cfg.heldout_questions,
                               eval_every=mechanism_eval_every(rl))
    return dataclasses.replace(rl, loop=loop,
                               model=dataclasses.replace(rl.model, init_adapters_from=adapters))


def _eval_config(cfg: PoweredConfig, sft_name: str | None, adapters: str | None) -> TrainConfig:
    if sft_name is None:  # the untrained model under the VRP prompt
        method = next(m for m, c in cfg.rl.items() if c.single_agent)
    else:
        method = next(m for m, s in cfg.warm_start.items() if s == sft_name)
    seed = cfg.seeds[0]
    return run_config(cfg, method, seed, adapters)


def sft_agent_steps(s: SFTConfig) -> int:
    """SFT steps summed over agents, from the config alone (built-in worked examples)."""
    d = s.data
    per_cell = min(d.examples_per_cell or d.train_per_cell, d.train_per_cell)
    rows = len(d.families) * len(d.levels) * per_cell  # per role
    if s.adapter.kind == "shared":  # one model on every role's rows
        return s.loop.epochs * math.ceil(rows * len(s.loop.roles) / s.loop.batch_size)
    return len(s.loop.roles) * s.loop.epochs * math.ceil(rows / s.loop.batch_size)


# --- the stage bodies (module attributes, so tests can replace them)
def stage_sft(config: SFTConfig, workdir: str, progress: bool) -> dict[str, Any]:
    from rema_jax.sft.train import run_sft

    sft = dataclasses.replace(config, eval=dataclasses.replace(config.eval, questions=0))
    run = run_sft(sft, workdir, progress=progress)
    s = run.summary
    return {"adapters": s["adapters"], "steps_per_agent": s["steps_per_agent"],
            "agent_steps": int(sum(s["steps_per_agent"].values())),
            **{k: v for k, v in s.items() if k.endswith(("/loss_first", "/loss_last"))}}


def stage_eval(config: TrainConfig, workdir: str, questions: int, tag: str) -> dict[str, Any]:
    from rema_jax.training.trainer import Trainer, heldout_subset

    trainer = Trainer(config, workdir, progress=False)
    try:
        trainer.evaluate(heldout_subset(trainer.test_tasks, questions), tag)
    finally:
        trainer.checkpoints.close()
    path = os.path.join(workdir, "eval", f"{tag}.jsonl")
    return {"eval_file": path, **heldout_scores(path)}


def stage_rl(config: TrainConfig, workdir: str, progress: bool) -> dict[str, Any]:
    from rema_jax.training import trainer as trainer_lib
    from rema_jax.training.metrics import read_jsonl

    summary = trainer_lib.train(config, workdir, progress=progress)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    step_s = [r["time/step_s"] for r in records if r.get("time/step_s") is not None]
    return {"steps": summary["steps"], "resumed_from_step": summary.get("resumed_from_step"),
            "diagnostics": rl_diagnostics(records),
            "step_s_median": float(np.median(step_s)) if step_s else None}


# ----------------------------------------------------------------------------- time plan
def _stage_formula(cfg: PoweredConfig, stage: Stage, costs: CostModel) -> tuple[float, str]:
    q = cfg.heldout_questions
    rows = eval_rows(q)
    if stage.kind == "sft":
        n = sft_agent_steps(cfg.sft[stage.sft])
        return (n * costs.sft_step_s + costs.stage_overhead_s,
                f"{n} agent-steps × {costs.sft_step_s:.1f} s + {costs.stage_overhead_s:.0f} s")
    if stage.kind in ("sft_eval", "base_eval"):
        return (rows * costs.eval_row_s + costs.stage_overhead_s,
                f"{q} questions ({rows} rows) × {costs.eval_row_s:.2f} s + {costs.stage_overhead_s:.0f} s")
    rl = run_config(cfg, stage.method, stage.seed, None)
    n_eval = len(eval_steps(rl))
    return (rl.loop.steps * costs.rl_step_s + n_eval * rows * costs.eval_row_s + costs.stage_overhead_s,
            f"{rl.loop.steps} steps × {costs.rl_step_s:.0f} s + {n_eval} eval(s) × {rows} rows × "
            f"{costs.eval_row_s:.2f} s + {costs.stage_overhead_s:.0f} s")


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
            rows.append({"stage": st.name, "status": "done", "minutes": done[st.name]["seconds"] / 60,
                         "basis": "recorded", "seed": st.seed})
            continue
        same = [r["seconds"] for n, r in done.items() if st.kind == "rl" and r.get("method") == st.method]
        if same:
            rows.append({"stage": st.name, "status": "todo", "minutes": float(np.mean(same)) / 60,
                         "basis": f"measured: finished {st.method} run(s)", "seed": st.seed})
            continue
        secs, basis = _stage_formula(cfg, st, costs)
        rows.append({"stage": st.name, "status": "todo", "minutes": secs / 60, "basis": f"{measured}: {basis}",
                     "seed": st.seed})
    return rows


def seeds_within_budget(cfg: PoweredConfig, rows: Sequence[Mapping[str, Any]],
                        done: Mapping[str, Any]) -> tuple[list[int], float]:
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
    rows = plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")})
    keep, total = seeds_within_budget(cfg, rows, done)
    rl0 = run_config(cfg, next(iter(cfg.rl)), cfg.seeds[0], None)
    lines = [f"powered experiment: {len(cfg.rl)} methods ({', '.join(cfg.rl)}) × seeds {list(cfg.seeds)}, "
             f"{cfg.heldout_questions} held-out questions, RL {rl0.loop.steps} steps per run"]
    for m, c in cfg.rl.items():
        r = run_config(cfg, m, cfg.seeds[0], None)
        mta = [s for s in phase_spans(r) if s.trained == (META_THINKING,)]
        lines.append(f"  {m:<18} from {cfg.warm_start[m]}; held-out evals at steps {eval_steps(r)}"
                     + (f"; MTA phases {[(s.start, s.end) for s in mta]}" if mta else ""))
    width = max(len(r["stage"]) for r in rows)
    lines.append(f"  {'stage'.ljust(width)}  status  minutes  basis")
    for r in rows:
        skip = r["seed"] is not None and r["seed"] not in keep
        lines.append(f"  {r['stage'].ljust(width)}  {('skip' if skip else r['status']):<6}  {r['minutes']:7.1f}  {r['basis']}")
    budget = cfg.time_budget_min
    lines.append(f"  {'total'.ljust(width)}          {total:7.1f}  "
                 + (f"budget {budget:.0f} min: " + ("all seeds fit" if len(keep) == len(cfg.seeds) else
                    f"seeds {[s for s in cfg.seeds if s not in keep]} do not fit and are skipped")
                    if budget else "no time budget"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runner
def _newest_file(directory: str) -> str | None:
    newest, when = None, -1.0
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            try:
                t = os.path.getmtime(p)
            except OSError:
                continue
            if t > when:
                newest, when = p, t
    return newest


def _where(directory: str) -> str:
    newest = _newest_file(directory) if os.path.isdir(directory) else None
    return directory + (f" (last file written: {newest})" if newest else "")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")


def stage_config(cfg: PoweredConfig, st: Stage) -> dict[str, Any]:
    """What a stage's outcome depends on, as JSON (paths left out): recorded with the stage, so a
    re-run with a changed config does not silently reuse it."""
    if st.kind == "sft":
        c: Any = cfg.sft[st.sft]
    elif st.kind in ("sft_eval", "base_eval"):  # what a greedy held-out evaluation depends on
        e = _eval_config(cfg, st.sft, None)
        c = {"model": e.model, "adapter": e.adapter, "rollout": e.rollout, "data": e.data, "grading": e.grading,
             "questions": cfg.heldout_questions, "sft": cfg.sft[st.sft] if st.sft else None}
    else:
        c = {"rl": to_dict(run_config(cfg, st.method, st.seed, None)), "sft": to_dict(cfg.sft[st.sft])}
    return json.loads(json.dumps(to_dict(c), default=str))


def _check_same_config(st: Stage, recorded: Mapping[str, Any] | None, now: Mapping[str, Any], where: str) -> None:
    if recorded is not None and recorded != now:
        raise ConfigError(f"stage {st.name}: {where} was made with a different config ({_config_diff(recorded, now)}); "
                          "use a new --workdir, or restore the old settings")


def run_powered(cfg: PoweredConfig, workdir: str, results_dir: str, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) every stage, then writes the report; returns ``results.json``'s content."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), to_dict(cfg))
    stages_path = os.path.join(workdir, STAGES_FILE)
    done = _read_json(stages_path)
    t_start = time.perf_counter()

    rows = plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")})
    keep, total = seeds_within_budget(cfg, rows, done)
    print(format_plan(cfg, done), flush=True)
    if len(keep) < len(cfg.seeds):
        print(f"[powered] time budget {cfg.time_budget_min:.0f} min: running seeds {keep} of {list(cfg.seeds)}",
              flush=True)

    for st in stage_list(cfg):
        if st.seed is not None and st.seed not in keep:
            continue
        if st.name in done:
            _check_same_config(st, done[st.name].get("config"), stage_config(cfg, st), f"its record in {stages_path}")
            print(f"[powered] stage {st.name}: done in an earlier run ({done[st.name]['seconds'] / 60:.1f} min), "
                  "skipped", flush=True)
            continue
        # before a seed group starts: re-check the budget with the stage times measured so far
        started = any(f"{m}/seed{st.seed}" in done for m in cfg.rl)
        if st.seed is not None and st.seed != keep[0] and cfg.time_budget_min and not started:
            now, _ = seeds_within_budget(cfg, plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")}), done)
            if st.seed not in now:
                print(f"[powered] seed {st.seed} no longer fits the {cfg.time_budget_min:.0f}-min budget "
                      "with the measured stage times: no further seed is started", flush=True)
                keep = keep[:keep.index(st.seed)]
                continue
        directory = os.path.join(workdir, st.directory)
        previous = os.path.join(directory, "config.json")
        if st.kind == "rl" and os.path.exists(previous) and os.path.isdir(os.path.join(directory, "checkpoints")):
            with open(previous, encoding="utf-8") as f:  # the trainer would resume from these checkpoints
                now = json.loads(json.dumps(to_dict(run_config(cfg, st.method, st.seed,
                                                               _adapters(st.sft, workdir, done))), default=str))
                _check_same_config(st, json.load(f), now, f"the checkpoint in {directory}")
        print(f"\n[powered] stage {st.name} → {directory}", flush=True)
        t0 = time.perf_counter()
        try:
            result = _run_stage(cfg, st, workdir, done, progress)
        except BaseException as e:
            partial = done.setdefault("_partial", {})
            partial[st.name] = partial.get(st.name, 0.0) + time.perf_counter() - t0
            _write_json(stages_path, done)
            if isinstance(e, (UserError, FileNotFoundError)):
                raise StageError(f"powered stage {st.name!r} failed while writing {_where(directory)}: "
                                 f"{type(e).__name__}: {e}") from e
            if isinstance(e, Exception):
                e.add_note(f"powered stage {st.name!r} failed while writing {_where(directory)}")
            raise
        result["seconds"] = time.perf_counter() - t0 + done.get("_partial", {}).pop(st.name, 0.0)
        result.update({"kind": st.kind, "method": st.method, "seed": st.seed, "directory": st.directory,
                       "config": stage_config(cfg, st)})
        done[st.name] = result
        _write_json(stages_path, done)

    finished_seeds = [s for s in cfg.seeds if all(f"{m}/seed{s}" in done for m in cfg.rl)]
    if not finished_seeds:
        raise StageError(f"powered report: no seed finished every method ({sorted(cfg.rl)}) in {workdir}")
    try:
        return report(cfg, workdir, results_dir, done, seeds=finished_seeds,
                      wall_this_run_min=(time.perf_counter() - t_start) / 60)
    except ReportWriteError as e:
        raise StageError(f"powered stage 'report' failed while writing {e.path}: {e.cause}") from e
    except (UserError, FileNotFoundError) as e:
        raise StageError(f"powered stage 'report' failed while reading the stages' files: "
                         f"{type(e).__name__}: {e}") from e


def _run_stage(cfg: PoweredConfig, st: Stage, workdir: str, done: Mapping[str, Any],
               progress: bool) -> dict[str, Any]:
    """Runs one stage; paths in the returned record are relative to ``workdir``."""
    this = globals()  # the stage bodies are looked up at call time (tests replace them)
    directory = os.path.join(workdir, st.directory)
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731
    if st.kind == "sft":
        out = this["stage_sft"](cfg.sft[st.sft], directory, progress)
        out["adapters"] = rel(out["adapters"])
        return out
    if st.kind in ("sft_eval", "base_eval"):
        adapters = None if st.kind == "base_eval" else _adapters(st.sft, workdir, done)
        out = this["stage_eval"](_eval_config(cfg, st.sft, adapters), directory, cfg.heldout_questions, "step_0")
        _check_eval_file(out["eval_file"], cfg.heldout_questions)
        out["eval_file"] = rel(out["eval_file"])
        return out
    rl = run_config(cfg, st.method, st.seed, _adapters(st.sft, workdir, done))
    out = this["stage_rl"](rl, directory, progress)
    if out["steps"] != rl.loop.steps:
        raise StageError(f"the run stopped at step {out['steps']} of {rl.loop.steps}")
    out["eval_files"] = {}
    for step in eval_steps(rl):
        path = os.path.join(directory, "eval", f"step_{step}.jsonl")
        _check_eval_file(path, cfg.heldout_questions)
        out["eval_files"][str(step)] = rel(path)
    out["final"] = heldout_scores(os.path.join(directory, "eval", f"step_{rl.loop.steps}.jsonl"))
    return out


def _adapters(sft_name: str, workdir: str, done: Mapping[str, Any]) -> str:
    rec = done.get(sft_name)
    if rec is None:
        raise FileNotFoundError(f"SFT stage {sft_name} has not finished (no record in {STAGES_FILE})")
    return os.path.join(workdir, rec["adapters"])


def _check_eval_file(path: str, questions: int) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"held-out evaluation {path} was not written")
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    if n != questions:
        raise StageError(f"{path}: {n} held-out records, expected {questions}")


# ----------------------------------------------------------------------------- report
class ReportWriteError(Exception):
    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"{path}: {type(cause).__name__}: {cause}")
        self.path, self.cause = path, f"{type(cause).__name__}: {cause}"


def _read_eval(path: str) -> dict[str, dict[str, Any]]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            for key in ("uid", "subject", "correct"):
                if key not in r:
                    raise StageError(f"{path}:{i}: eval record without {key!r}")
            out[r["uid"]] = r
    return out


class _Questions:
    """The held-out questions in one fixed order (the first SFT evaluation's), with family / level."""

    def __init__(self, path: str):
        recs = _read_eval(path)
        self.uids = list(recs)
        self.family = np.array([recs[u]["subject"] for u in self.uids])
        self.level = np.array([recs[u].get("level") for u in self.uids])

    def vector(self, path: str) -> np.ndarray:
        recs = _read_eval(path)
        if set(recs) != set(self.uids):
            missing = sorted(set(self.uids) - set(recs))[:3]
            extra = sorted(set(recs) - set(self.uids))[:3]
            raise StageError(f"{path}: not the report's held-out questions (missing {missing}, extra {extra})")
        return np.array([float(bool(recs[u]["correct"])) for u in self.uids])


def _pct(x: float) -> float:
    return 100.0 * float(x)


def report(cfg: PoweredConfig, workdir: str, results_dir: str, done: Mapping[str, Any], *,
           seeds: Sequence[int], wall_this_run_min: float = 0.0) -> dict[str, Any]:
    """Statistics, tables and plots from the finished stages; writes ``powered_experiment.{md,json}``,
    ``powered_accuracy.png`` and ``powered_mechanism.png`` under ``results_dir``."""
    from rema_jax.eval import stats
    from rema_jax.eval.table import markdown_table

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(workdir, p)

    boot = dict(n_boot=cfg.n_boot, seed=0)
    sft_names = list(cfg.sft)
    qs = _Questions(resolve(done[f"{sft_names[0]}_eval"]["eval_file"]))
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
            role = "single" if cfg.rl[m].single_agent else REASONING
            diag = rec.get("diagnostics", {}).get(role, {})
            runs.append({"method": m, "seed": s, "steps": rec["steps"], "accuracy": _pct(v.mean()),
                         "by_family": {f: _pct(v[qs.family == f].mean()) for f in families},
                         "reward_first": diag.get("reward_first"), "reward_last": diag.get("reward_last"),
                         "frac_zero_variance_groups": diag.get("frac_zero_variance_groups"),
                         "minutes": rec["seconds"] / 60, "resumed_from_step": rec.get("resumed_from_step")})
        final[m] = np.stack(rows)

    def ci(x, b=None):
        return (stats.bootstrap_mean_ci(x, **boot) if b is None else stats.paired_difference_ci(x, b, **boot)).scaled(100)

    methods = {}
    for m in cfg.rl:
        sft = cfg.warm_start[m]
        methods[m] = {"sft": sft, "start": ci(start[sft]).as_dict(), "final": ci(final[m]).as_dict(),
                      "rl_minus_start": ci(final[m], start[sft]).as_dict(),
                      "by_family": {f: ci(final[m][:, qs.family == f]).as_dict() for f in families}}
    starts = {sft_label(s): {"accuracy": ci(start[s]).as_dict(),
                             "by_family": {f: ci(start[s][qs.family == f]).as_dict() for f in families}}
              for s in sft_names}
    comparisons = []
    for a, b in cfg.comparisons:
        d = ci(final[a], final[b])
        comparisons.append({"a": a, "b": b, "difference": d.as_dict(),
                            "reading": stats.reading(d, f"the paired difference {a} − {b}")})

    # Table 1: rows = families + Average, columns = [VRP] + per SFT: its start, then its methods.
    columns: dict[str, dict[str, float]] = {}
    if base is not None:
        columns["VRP"] = {f: _pct(base[qs.family == f].mean()) for f in families}
    for s in sft_names:
        columns[sft_label(s)] = {f: _pct(start[s][qs.family == f].mean()) for f in families}
        for m in cfg.rl:
            if cfg.warm_start[m] == s:
                columns[m] = {f: _pct(final[m][:, qs.family == f].mean()) for f in families}
    table1 = markdown_table(columns, columns=list(columns), benchmarks=families, average=True,
                            row_header="Task family")
    cells = [(f, lv) for f in families for lv in levels if ((qs.family == f) & (qs.level == lv)).any()]
    by_cell: dict[str, dict[str, float]] = {}
    vectors = {"VRP": base} if base is not None else {}
    for s in sft_names:
        vectors[sft_label(s)] = start[s]
        vectors.update({m: final[m] for m in cfg.rl if cfg.warm_start[m] == s})
    for col, v in vectors.items():
        v2 = np.atleast_2d(v)
        by_cell[col] = {f"{f} L{lv}": _pct(v2[:, (qs.family == f) & (qs.level == lv)].mean()) for f, lv in cells}
    cell_table = markdown_table(by_cell, columns=list(by_cell), benchmarks=[f"{f} L{lv}" for f, lv in cells],
                                average=False, row_header="family, level")
    hard = max(levels) if levels else None
    hard_line = None
    if hard is not None:
        at = {sft_label(s): _pct(start[s][qs.level == hard].mean()) for s in sft_names}
        verdict = ("neither 0% nor 100%: informative" if all(0 < v < 100 for v in at.values())
                   else "at 0% or 100% for some start: this level cannot show a difference there")
        hard_line = (f"Level {hard} after SFT: " + ", ".join(f"{k} {v:.1f}%" for k, v in at.items())
                     + f" ({verdict}).")

    mechanism = _mechanism(cfg, done, qs, start, seeds, ci, resolve)

    out = {
        "title": "Powered experiment: ReMA vs VRP_RL from SFTs of the same budget",
        "date": time.strftime("%Y-%m-%d"),
        "seeds": list(seeds), "seeds_planned": list(cfg.seeds),
        "seeds_skipped": [s for s in cfg.seeds if s not in seeds],
        "heldout_questions": len(qs.uids), "families": families, "levels": levels,
        "rl_steps": cfg.rl[next(iter(cfg.rl))].loop.steps, "decoding": "greedy",
        "model": _model_name(cfg.rl[next(iter(cfg.rl))]),
        "ci": {"level": 0.95, "method": "percentile bootstrap, two-level: seeds and questions resampled "
                                        "with replacement, one question resample shared by all seeds",
               "n_boot": cfg.n_boot},
        "runs": runs, "methods": methods, "sft_starts": starts, "comparisons": comparisons,
        "table1": columns, "by_family_level": by_cell, "hard_level": hard_line,
        "mechanism": mechanism,
        "base": ({"accuracy": ci(base).as_dict()} if base is not None else None),
        "stage_minutes": {k: v["seconds"] / 60 for k, v in done.items() if not k.startswith("_")},
        "total_stage_minutes": sum(v["seconds"] for k, v in done.items() if not k.startswith("_")) / 60,
        "time_budget_min": cfg.time_budget_min, "wall_this_invocation_min": wall_this_run_min,
        "sft": {s: {k: v for k, v in done[s].items() if k.endswith(("/loss_first", "/loss_last", "steps_per_agent"))}
                for s in sft_names},
    }
    readings = [c["reading"] for c in comparisons]
    for m, r in methods.items():
        d = stats.Interval(**r["rl_minus_start"])
        readings.append(stats.reading(d, f"{m} − its SFT start ({sft_label(r['sft'])})"))
    for m, mech in mechanism.items():
        for ph in mech["phases"]:
            if ph["trained"] == META_THINKING:
                d = stats.Interval(**ph["delta"])
                readings.append(f"{m}, MTA phase {ph['phase']} (steps {ph['start']}→{ph['end']}, RA frozen): RA "
                                f"success given the MTA's plans {ph['start_mean']['estimate']:.1f} → "
                                f"{ph['end_mean']['estimate']:.1f}%; "
                                + stats.reading(d, "end − start"))
    if out["seeds_skipped"]:
        readings.append(f"only {len(seeds)} of {len(cfg.seeds)} planned seeds finished within the "
                        f"{cfg.time_budget_min:.0f}-min budget (seeds {out['seeds_skipped']} skipped): fewer seeds, "
                        f"the same {len(qs.uids)} held-out questions")
    out["readings"] = readings

    os.makedirs(results_dir, exist_ok=True)
    paths = {"md": os.path.join(results_dir, f"{RESULTS_STEM}.md"),
             "json": os.path.join(results_dir, f"{RESULTS_STEM}.json"),
             "accuracy_png": os.path.join(results_dir, "powered_accuracy.png"),
             "mechanism_png": os.path.join(results_dir, "powered_mechanism.png")}
    out["files"] = paths
    for key, fn in (("accuracy_png", lambda p: _plot_accuracy(out, p)),
                    ("mechanism_png", lambda p: _plot_mechanism(out, p)),
                    ("md", lambda p: _write_text(p, _markdown(out, table1, cell_table))),
                    ("json", lambda p: _write_json(p, out))):
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


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
                seen += [r.get("phase/trained") for r in recs
                         if sp.start < r.get("step", -1) <= sp.end and "phase/trained" in r]
            return None if not seen else all(t == "+".join(sp.trained) for t in seen)

        phases = []
        for sp in spans:
            if sp.start not in evaluated or sp.end not in evaluated:
                continue
            a = np.stack([vec(s, sp.start) for s in seeds])
            b = np.stack([vec(s, sp.end) for s in seeds])
            phases.append({
                "phase": sp.index, "trained": "+".join(sp.trained), "start": sp.start, "end": sp.end,
                "only_this_agent_updated": trained_logged(sp),
                "per_seed": [{"seed": s, "start": _pct(a[i].mean()), "end": _pct(b[i].mean()),
                              "delta": _pct(b[i].mean() - a[i].mean())} for i, s in enumerate(seeds)],
                "start_mean": ci(a).as_dict(), "end_mean": ci(b).as_dict(), "delta": ci(b, a).as_dict()})
        mta = [p for p in phases if p["trained"] == META_THINKING]
        pooled = None
        if len(mta) > 1:  # all MTA phases: (phase, question) pairs as the units
            a = np.concatenate([np.stack([vec(s, p["start"]) for s in seeds]) for p in mta], axis=1)
            b = np.concatenate([np.stack([vec(s, p["end"]) for s in seeds]) for p in mta], axis=1)
            pooled = {"start_mean": ci(a).as_dict(), "end_mean": ci(b).as_dict(), "delta": ci(b, a).as_dict()}
        out[m] = {"reward": cfg.rl[m].reward.kind, "phases": phases, "mta_pooled": pooled}
    return out


def _fmt(d: Mapping[str, float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{d['estimate']:{s}.1f} [{d['low']:{s}.1f}, {d['high']:{s}.1f}]"


def _markdown(out: Mapping[str, Any], table1: str, cell_table: str) -> str:
    L = [f"# {out['title']}", "",
         f"Date: {out['date']}. {out['model']}, built-in tasks ({', '.join(out['families'])}; levels "
         f"{', '.join(map(str, out['levels']))}), {out['heldout_questions']} held-out questions "
         f"(greedy decoding), RL {out['rl_steps']} steps per run, seeds {out['seeds']}"
         + (f" (planned {out['seeds_planned']}; {out['seeds_skipped']} skipped by the "
            f"{out['time_budget_min']:.0f}-min budget)" if out["seeds_skipped"] else "")
         + f". Stage time {out['total_stage_minutes']:.1f} min.", "",
         f"95% CIs: {out['ci']['method']} ({out['ci']['n_boot']} replicates). Accuracy in %.", "",
         "## Reading", ""]
    L += [f"- {r}" for r in out["readings"]]
    if out.get("hard_level"):
        L.append(f"- {out['hard_level']}")
    L += ["", "## Methods (mean over seeds)", "",
          "| method | SFT start | after RL: mean [95% CI] | RL − start [95% CI] |", "|---|---|---|---|"]
    for m, r in out["methods"].items():
        L.append(f"| {m} | {_fmt(r['start'])} | {_fmt(r['final'])} | {_fmt(r['rl_minus_start'], True)} |")
    L += ["", "## Paired differences (seed i with seed i, question with question)", "",
          "| difference | mean [95% CI] | CI excludes 0 |", "|---|---|---|"]
    for c in out["comparisons"]:
        d = c["difference"]
        L.append(f"| {c['a']} − {c['b']} | {_fmt(d, True)} | {'yes' if d['low'] > 0 or d['high'] < 0 else 'no'} |")
    L += ["", "## Table 1 layout (per family; RL columns: mean over seeds; deltas against the first column)",
          "", table1, "Per family, mean [95% CI]:", "",
          "| method | " + " | ".join(out["families"]) + " |", "|---|" + "---|" * len(out["families"])]
    for m, r in out["methods"].items():
        L.append(f"| {m} | " + " | ".join(_fmt(r["by_family"][f]) for f in out["families"]) + " |")
    L += ["", "## Per family and level", "", cell_table,
          "## Runs", "", "| method | seed | steps | held-out accuracy | low-level reward first → last | "
          "zero-variance groups | minutes |", "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        rw = (f"{r['reward_first']:+.3f} → {r['reward_last']:+.3f}"
              if r["reward_first"] is not None and r["reward_last"] is not None else "–")
        zv = f"{100 * r['frac_zero_variance_groups']:.0f}%" if r["frac_zero_variance_groups"] is not None else "–"
        L.append(f"| {r['method']} | {r['seed']} | {r['steps']} | {r['accuracy']:.1f} | {rw} | {zv} | {r['minutes']:.1f} |")
    L += ["", "## Mechanism: the RA's success given the MTA's plans, per phase", "",
          "Greedy held-out accuracy at each phase's start and end. In an MTA phase the RA is frozen (the same "
          "adapter throughout), so start → end measures plans that help (or hurt) the RA; RA phases "
          "(MTA frozen) are shown for contrast. Step 0 is the SFT evaluation. 'only trained' = every step of "
          "the phase, in every seed's metrics.jsonl, updated that agent alone.", "",
          "| method | phase | trained | only trained | steps | start mean [95% CI] | end mean [95% CI] | "
          "end − start [95% CI] | per seed (start → end) |", "|---|---|---|---|---|---|---|---|---|"]
    for m, mech in out["mechanism"].items():
        for p in mech["phases"]:
            seeds = ", ".join(f"s{x['seed']} {x['start']:.1f} → {x['end']:.1f}" for x in p["per_seed"])
            only = {True: "yes", False: "NO", None: "–"}[p["only_this_agent_updated"]]
            L.append(f"| {m} | {p['phase']} | {p['trained']} | {only} | {p['start']}→{p['end']} | {_fmt(p['start_mean'])} | "
                     f"{_fmt(p['end_mean'])} | {_fmt(p['delta'], True)} | {seeds} |")
        if mech["mta_pooled"]:
            p = mech["mta_pooled"]
            L.append(f"| {m} | all MTA | meta_thinking | | – | {_fmt(p['start_mean'])} | {_fmt(p['end_mean'])} | "
                     f"{_fmt(p['delta'], True)} | |")
    L += ["", f"![accuracy]({os.path.basename(out['files']['accuracy_png'])})",
          f"![mechanism]({os.path.basename(out['files']['mechanism_png'])})", "",
          "## Stage times (minutes)", "", "| stage | minutes |", "|---|---|"]
    L += [f"| {k} | {v:.1f} |" for k, v in out["stage_minutes"].items()]
    return "\n".join(L) + "\n"


def _plot_accuracy(out: Mapping[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names, est, lo, hi, colors = [], [], [], [], []
    if out.get("base"):
        b = out["base"]["accuracy"]
        names.append("VRP"); est.append(b["estimate"]); lo.append(b["low"]); hi.append(b["high"]); colors.append("#999999")
    for label, s in out["sft_starts"].items():
        names.append(label); a = s["accuracy"]
        est.append(a["estimate"]); lo.append(a["low"]); hi.append(a["high"]); colors.append("#8fa8c8")
        for m, r in out["methods"].items():
            if label == sft_label(r["sft"]):
                f = r["final"]
                names.append(m); est.append(f["estimate"]); lo.append(f["low"]); hi.append(f["high"])
                colors.append("#dd8452")
    x = np.arange(len(names))
    ax.bar(x, est, color=colors, yerr=[np.array(est) - lo, np.array(hi) - est], capsize=4)
    for r in out["runs"]:
        ax.plot(names.index(r["method"]), r["accuracy"], "k.", ms=6, alpha=0.7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(ylabel="held-out accuracy (%)", ylim=(0, 100),
           title=f"{out['heldout_questions']} questions, seeds {out['seeds']} (dots: runs; bars: 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    labels = [f"{c['a']} − {c['b']}" for c in out["comparisons"]]
    labels += [f"{m} − start" for m in out["methods"]]
    ds = [c["difference"] for c in out["comparisons"]] + [r["rl_minus_start"] for r in out["methods"].values()]
    y = np.arange(len(ds))[::-1]
    ax2.errorbar([d["estimate"] for d in ds], y, xerr=[[d["estimate"] - d["low"] for d in ds],
                                                       [d["high"] - d["estimate"] for d in ds]],
                 fmt="o", capsize=4)
    ax2.axvline(0, color="k", lw=0.8, ls="--")
    ax2.set_yticks(y, labels)
    ax2.set(xlabel="paired difference (points)", title="paired differences, 95% CI")
    ax2.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_mechanism(out: Mapping[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech = out["mechanism"]
    n = max(len(mech), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (m, d) in zip(axes[0], mech.items()):
        phases = d["phases"]
        for p in phases:
            if p["trained"] == META_THINKING:
                ax.axvspan(p["start"], p["end"], color="#dd8452", alpha=0.15)
                dl = p["delta"]
                ax.text((p["start"] + p["end"]) / 2, 0.03, f"Δ {dl['estimate']:+.1f}\n[{dl['low']:+.1f}, {dl['high']:+.1f}]",
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
        seeds = [x["seed"] for x in phases[0]["per_seed"]] if phases else []
        for i, s in enumerate(seeds):
            xs = [phases[0]["start"]] + [p["end"] for p in phases]
            ys = [phases[0]["per_seed"][i]["start"]] + [p["per_seed"][i]["end"] for p in phases]
            ax.plot(xs, ys, color="0.6", lw=1, marker=".", label="seeds" if i == 0 else None)
        if phases:
            pts = [(phases[0]["start"], phases[0]["start_mean"])] + [(p["end"], p["end_mean"]) for p in phases]
            ax.errorbar([p[0] for p in pts], [p[1]["estimate"] for p in pts],
                        yerr=[[p[1]["estimate"] - p[1]["low"] for p in pts], [p[1]["high"] - p[1]["estimate"] for p in pts]],
                        color="C0", marker="o", capsize=4, lw=2, label="mean, 95% CI")
        ax.set(title=f"{m}: shaded = MTA phases (RA frozen)", xlabel="RL step", ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not mech:
        axes[0][0].text(0.5, 0.5, "no two-agent method", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
