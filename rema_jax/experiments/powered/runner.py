"""Runs (or resumes) the powered experiment's stages: ``stages.json`` (written atomically) records the
finished ones, a stage or half-done run made with a different config is refused, the time budget drops
whole seed groups, a failed stage is named with the directory it was writing; then the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping

from rema_jax.config_utils import ConfigError, to_dict
from rema_jax.errors import UserError
from rema_jax.experiments.heldout import check_eval_file, heldout_scores
from rema_jax.experiments.powered import bodies
from rema_jax.experiments.powered.analysis import ReportWriteError, report
from rema_jax.experiments.powered.config import STAGES_FILE, PoweredConfig
from rema_jax.experiments.powered.stages import (
    Stage,
    branch_step,
    eval_config,
    eval_steps,
    run_config,
    stage_config,
    stage_list,
)
from rema_jax.experiments.powered.timeplan import format_plan, plan, seeds_within_budget
from rema_jax.experiments.records import StageError, read_json, write_json


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


_OFF = (None, [], {}, False)  # what a config field added since a record was written defaults to


def _differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Flat keys whose values differ. A key the record lacks (a field added to the config since) is the
    same when its value now is off / empty (``_OFF``): the behaviour the record was made with."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not (k not in a and b[k] in _OFF))


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    a, b = _flat(old), _flat(new)
    keys = _differing_keys(old, new)
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")


def _check_same_config(st: Stage, recorded: Mapping[str, Any] | None, now: Mapping[str, Any], where: str) -> None:
    if recorded is not None and _differing_keys(recorded, now):
        raise ConfigError(
            f"stage {st.name}: {where} was made with a different config ({_config_diff(recorded, now)}); "
            "use a new --workdir, or restore the old settings"
        )


def run_powered(cfg: PoweredConfig, workdir: str, results_dir: str, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) every stage, then writes the report; returns ``results.json``'s content."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), to_dict(cfg))
    stages_path = os.path.join(workdir, STAGES_FILE)
    done = read_json(stages_path)
    t_start = time.perf_counter()

    rows = plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")})
    keep, total = seeds_within_budget(cfg, rows, done)
    print(format_plan(cfg, done), flush=True)
    if len(keep) < len(cfg.seeds):
        print(
            f"[powered] time budget {cfg.time_budget_min:.0f} min: running seeds {keep} of {list(cfg.seeds)}",
            flush=True,
        )

    for st in stage_list(cfg):
        if st.seed is not None and st.seed not in keep:
            continue
        if st.name in done:
            _check_same_config(st, done[st.name].get("config"), stage_config(cfg, st), f"its record in {stages_path}")
            print(
                f"[powered] stage {st.name}: done in an earlier run ({done[st.name]['seconds'] / 60:.1f} min), skipped",
                flush=True,
            )
            continue
        # before a seed group starts: re-check the budget with the stage times measured so far
        started = any(f"{m}/seed{st.seed}" in done for m in cfg.rl)
        if st.seed is not None and st.seed != keep[0] and cfg.time_budget_min and not started:
            now, _ = seeds_within_budget(cfg, plan(cfg, {k: v for k, v in done.items() if not k.startswith("_")}), done)
            if st.seed not in now:
                print(
                    f"[powered] seed {st.seed} no longer fits the {cfg.time_budget_min:.0f}-min budget "
                    "with the measured stage times: no further seed is started",
                    flush=True,
                )
                keep = keep[: keep.index(st.seed)]
                continue
        directory = os.path.join(workdir, st.directory)
        previous = os.path.join(directory, "config.json")
        if st.kind == "rl" and os.path.exists(previous) and os.path.isdir(os.path.join(directory, "checkpoints")):
            with open(previous, encoding="utf-8") as f:  # the trainer would resume from these checkpoints
                now = json.loads(
                    json.dumps(
                        to_dict(run_config(cfg, st.method, st.seed, _adapters(st.sft, workdir, done))), default=str
                    )
                )
                _check_same_config(st, json.load(f), now, f"the checkpoint in {directory}")
        print(f"\n[powered] stage {st.name} → {directory}", flush=True)
        t0 = time.perf_counter()
        try:
            result = _run_stage(cfg, st, workdir, done, progress)
        except BaseException as e:
            partial = done.setdefault("_partial", {})
            partial[st.name] = partial.get(st.name, 0.0) + time.perf_counter() - t0
            write_json(stages_path, done)
            if isinstance(e, (UserError, FileNotFoundError)):
                raise StageError(
                    f"powered stage {st.name!r} failed while writing {_where(directory)}: {type(e).__name__}: {e}"
                ) from e
            if isinstance(e, Exception):
                e.add_note(f"powered stage {st.name!r} failed while writing {_where(directory)}")
            raise
        result["seconds"] = time.perf_counter() - t0 + done.get("_partial", {}).pop(st.name, 0.0)
        result.update(
            {
                "kind": st.kind,
                "method": st.method,
                "seed": st.seed,
                "directory": st.directory,
                "config": stage_config(cfg, st),
            }
        )
        done[st.name] = result
        write_json(stages_path, done)

    finished_seeds = [s for s in cfg.seeds if all(f"{m}/seed{s}" in done for m in cfg.rl)]
    if not finished_seeds:
        raise StageError(f"powered report: no seed finished every method ({sorted(cfg.rl)}) in {workdir}")
    try:
        return report(
            cfg,
            workdir,
            results_dir,
            done,
            seeds=finished_seeds,
            wall_this_run_min=(time.perf_counter() - t_start) / 60,
        )
    except ReportWriteError as e:
        raise StageError(f"powered stage 'report' failed while writing {e.path}: {e.cause}") from e
    except (UserError, FileNotFoundError) as e:
        raise StageError(
            f"powered stage 'report' failed while reading the stages' files: {type(e).__name__}: {e}"
        ) from e


def _run_stage(cfg: PoweredConfig, st: Stage, workdir: str, done: Mapping[str, Any], progress: bool) -> dict[str, Any]:
    """Runs one stage; paths in the returned record are relative to ``workdir``. The stage bodies are
    looked up in ``bodies`` at call time (tests replace them)."""
    directory = os.path.join(workdir, st.directory)
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731
    if st.kind == "sft":
        out = bodies.stage_sft(cfg.sft[st.sft], directory, progress)
        out["adapters"] = rel(out["adapters"])
        return out
    if st.kind in ("sft_eval", "base_eval"):
        adapters = None if st.kind == "base_eval" else _adapters(st.sft, workdir, done)
        out = bodies.stage_eval(eval_config(cfg, st.sft, adapters), directory, cfg.heldout_questions, "step_0")
        check_eval_file(out["eval_file"], cfg.heldout_questions)
        out["eval_file"] = rel(out["eval_file"])
        return out
    rl = run_config(cfg, st.method, st.seed, _adapters(st.sft, workdir, done))
    branch = _start_branch(cfg, st, workdir) if st.method in cfg.branches else None
    out = bodies.stage_rl(rl, directory, progress)
    if branch is not None:
        out["branched_from"] = branch
    if out["steps"] != rl.loop.steps:
        raise StageError(f"the run stopped at step {out['steps']} of {rl.loop.steps}")
    out["eval_files"] = {}
    for step in eval_steps(rl):
        path = os.path.join(directory, "eval", f"step_{step}.jsonl")
        check_eval_file(path, cfg.heldout_questions)
        out["eval_files"][str(step)] = rel(path)
    out["final"] = heldout_scores(os.path.join(directory, "eval", f"step_{rl.loop.steps}.jsonl"))
    return out


BRANCH_FILE = "branched_from.json"


def _start_branch(cfg: PoweredConfig, st: Stage, workdir: str) -> dict[str, Any]:
    """Seeds a branch run's directory from its parent's run of the same seed, once: the parent's
    checkpoint at ``branch_step`` (the trainer resumes from it), its held-out evaluations up to that
    step and its metrics records up to it (marked ``branch/from_parent``; the roles whose reward
    differs are not trained there, but their logged rewards are the parent's). The checkpoint
    directory is renamed into place last, so a crash midway leaves no checkpoint and the next run
    seeds again."""
    parent = cfg.branches[st.method]
    k = branch_step(cfg, st.method)
    src = os.path.join(workdir, parent, f"seed{st.seed}")
    dst = os.path.join(workdir, st.directory)
    record = {"method": parent, "step": k, "directory": os.path.relpath(src, workdir)}
    if os.path.isdir(os.path.join(dst, "checkpoints")):  # seeded before (the run may have gone on since)
        return record
    ckpt = os.path.join(src, "checkpoints", str(k))
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(
            f"branch {st.name} starts from {parent}'s checkpoint at step {k}, but {ckpt} does not exist "
            f"(was {parent}/seed{st.seed} run without checkpoint.keep_steps={k}?)"
        )
    os.makedirs(os.path.join(dst, "eval"), exist_ok=True)
    for step in eval_steps(run_config(cfg, st.method, st.seed, None)):
        if step <= k:
            shutil.copyfile(
                os.path.join(src, "eval", f"step_{step}.jsonl"), os.path.join(dst, "eval", f"step_{step}.jsonl")
            )
    with open(os.path.join(src, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(dst, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            if r.get("step", 0) <= k:
                f.write(json.dumps({**r, "branch/from_parent": 1}, sort_keys=True) + "\n")
    write_json(os.path.join(dst, BRANCH_FILE), record)
    tmp = os.path.join(dst, "checkpoints.branch-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, os.path.join(tmp, str(k)))
    os.replace(tmp, os.path.join(dst, "checkpoints"))
    print(f"[powered] stage {st.name}: starts from {parent}/seed{st.seed} at step {k} (shared steps)", flush=True)
    return record


def _adapters(sft_name: str, workdir: str, done: Mapping[str, Any]) -> str:
    rec = done.get(sft_name)
    if rec is None:
        raise FileNotFoundError(f"SFT stage {sft_name} has not finished (no record in {STAGES_FILE})")
    return os.path.join(workdir, rec["adapters"])
