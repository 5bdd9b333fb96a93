"""What the powered experiment runs: the schedule's phases and evaluation steps of one RL run, the
stage list (seed-major), each stage's config (RL run, greedy held-out evaluation) and the record of
what a stage's outcome depends on (``stage_config``, checked on resume)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from rema_jax.config_utils import to_dict
from rema_jax.experiments.powered.config import PoweredConfig
from rema_jax.rewards import RewardConfig
from rema_jax.rollout import META_THINKING, REASONING
from rema_jax.sft.train import SFTConfig
from rema_jax.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class PhaseSpan:
    index: int
    trained: tuple[str, ...]
    start: int  # first step of the phase (the policy *before* it = the checkpoint at `start`)
    end: int  # the checkpoint after its last step


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


def roles_rewarded_differently(a: RewardConfig, b: RewardConfig) -> tuple[str, ...]:
    """The roles whose per-row reward differs between two reward configs (the rule of
    ``training.experience.collect_experience``): the consistency ablation changes only the MTA's
    reward (the RA's is the paper's in both); any other difference, conservatively, every role."""
    if a == b:
        return ()
    if {a.kind, b.kind} == {"paper", "consistency"} and dataclasses.replace(a, kind=b.kind) == b:
        return (META_THINKING,)
    return (META_THINKING, REASONING)


def branch_step(cfg: PoweredConfig, child: str) -> int:
    """The step up to which ``child`` and its parent (``cfg.branches[child]``) are the same run: the
    start of the first phase that trains a role whose reward differs. Before it the trained roles get
    the same rewards, and sampling, data order and updates do not read the other roles' rewards, so
    the child resumes from the parent's checkpoint at this step with the parent's evaluations up to it
    (exact, like any resume: tests/test_experiment_powered.py checks it bit for bit)."""
    a, b = cfg.rl[cfg.branches[child]], cfg.rl[child]
    differ = set(roles_rewarded_differently(a.reward, b.reward))
    return next((sp.start for sp in phase_spans(b) if differ & set(sp.trained)), b.loop.steps)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "base_eval" | "sft" | "sft_eval" | "rl"
    directory: str  # relative to the workdir
    sft: str | None = None
    method: str | None = None
    seed: int | None = None


def sft_label(sft_name: str) -> str:
    """``SFT_VRP`` → ``VRP+SFT`` (the Table-1 column of the SFT starting point)."""
    return (sft_name[4:] if sft_name.startswith("SFT_") else sft_name) + "+SFT"


def stage_list(cfg: PoweredConfig) -> list[Stage]:
    """Every stage in run order: the base eval (optional), each SFT and its eval, then the RL runs
    seed-major (seed 0 of every method, then seed 1, ...), so stopping early leaves paired seed groups."""
    out = []
    if cfg.base_eval:
        out.append(Stage("VRP_base", "base_eval", "VRP_base"))
    for name in cfg.sft:
        out.append(Stage(name, "sft", name, sft=name))
        out.append(Stage(f"{name}_eval", "sft_eval", f"{name}_eval", sft=name))
    for seed in cfg.seeds:
        for method in cfg.rl:
            out.append(
                Stage(
                    f"{method}/seed{seed}",
                    "rl",
                    os.path.join(method, f"seed{seed}"),
                    sft=cfg.warm_start[method],
                    method=method,
                    seed=seed,
                )
            )
    return out


def run_config(cfg: PoweredConfig, method: str, seed: int, adapters: str | None) -> TrainConfig:
    """One RL run's config: the method's, from ``adapters``, with ``loop.seed = seed``, evals on the
    held-out questions at every phase boundary and the end (no step-0 eval: the SFT stage's)."""
    rl = cfg.rl[method]
    loop = dataclasses.replace(
        rl.loop, seed=seed, eval_before=False, eval_questions=cfg.heldout_questions, eval_every=mechanism_eval_every(rl)
    )
    checkpoint = rl.checkpoint
    branched = {branch_step(cfg, c) for c, p in cfg.branches.items() if p == method}
    if branched:  # the parent keeps the checkpoints its branches start from
        checkpoint = dataclasses.replace(checkpoint, keep_steps=tuple(sorted(set(checkpoint.keep_steps) | branched)))
    return dataclasses.replace(
        rl, loop=loop, checkpoint=checkpoint, model=dataclasses.replace(rl.model, init_adapters_from=adapters)
    )


def eval_config(cfg: PoweredConfig, sft_name: str | None, adapters: str | None) -> TrainConfig:
    """The config of a greedy held-out evaluation: a method warm-started from ``sft_name`` (the
    single-agent method for the untrained model, ``sft_name=None``)."""
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


def stage_config(cfg: PoweredConfig, st: Stage) -> dict[str, Any]:
    """What a stage's outcome depends on, as JSON (paths left out): recorded with the stage, so a
    re-run with a changed config does not silently reuse it."""
    if st.kind == "sft":
        c: Any = cfg.sft[st.sft]
    elif st.kind in ("sft_eval", "base_eval"):  # what a greedy held-out evaluation depends on
        e = eval_config(cfg, st.sft, None)
        c = {
            "model": e.model,
            "adapter": e.adapter,
            "rollout": e.rollout,
            "data": e.data,
            "grading": e.grading,
            "questions": cfg.heldout_questions,
            "sft": cfg.sft[st.sft] if st.sft else None,
        }
    else:
        c = {"rl": to_dict(run_config(cfg, st.method, st.seed, None)), "sft": to_dict(cfg.sft[st.sft])}
        if st.method in cfg.branches:
            c["branch"] = {"from": cfg.branches[st.method], "step": branch_step(cfg, st.method)}
    return json.loads(json.dumps(to_dict(c), default=str))
