"""The powered-experiment preset (launch/experiment.py --preset=powered, rema_jax/experiments/powered/):
the preset's design and budget, config cross-checks, the schedule's evaluation steps, the stage
runner (stages.json, skip on re-run, a failed stage named with its directory, the time budget
dropping seeds) and the report (CIs, paired differences, Table 1, mechanism) with stand-in stages;
and, marked slow, the whole preset on a tiny random model with a kill mid-RL and a branch run against
the same run from step 0."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rema_jax.config_utils import ConfigError
from rema_jax.experiments import powered
from rema_jax.experiments.powered import bodies
from rema_jax.experiments.records import StageError
from rema_jax.models import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}


def preset_raw():
    sys.path.insert(0, REPO)
    from configs import experiment_powered

    return experiment_powered.get_config()


def small_raw(*, seeds=2, steps=2, phase=1, levels=(1, 2), test_per_cell=2, tiny=True):
    """The preset shrunk: a tiny random model, few questions, ``steps`` RL steps with phases of ``phase``."""
    c = preset_raw()
    for s in c.sft.values():
        s.data.levels = levels
        s.data.train_per_cell = 3
        s.data.test_per_cell = test_per_cell
        s.data.examples_per_cell = 1
        s.loop.epochs = 1
        s.loop.max_seq_len = 256
        s.model.max_cache_len = 256
    for r in c.rl.values():
        r.data.levels = levels
        r.data.train_per_cell = 3
        r.data.test_per_cell = test_per_cell
        r.rollout.max_new_tokens = 8
        r.loop.steps = steps
        r.loop.questions_per_step = 2
        r.schedule.reasoning_steps = r.schedule.meta_thinking_steps = phase
    for s in list(c.sft.values()) + list(c.rl.values()):
        if tiny:
            s.model.random_init = TINY
        s.adapter.rank = 4
        s.adapter.alpha = 8.0
    c.seeds = seeds
    c.heldout_questions = 4 * len(levels) * test_per_cell
    c.n_boot = 500
    c.time_budget_min = 0.0
    return c


# ------------------------------------------------------------------ the preset itself
def test_preset_design_and_budget():
    cfg = powered.load_powered_config(preset_raw())
    assert list(cfg.rl) == ["VRP_RL", "ReMA", "ReMA_consistency"]
    assert list(cfg.sft) == ["SFT_VRP", "SFT_ReMA"] and len(cfg.seeds) >= 3
    assert cfg.heldout_questions == 120 and cfg.rl["ReMA_consistency"].reward.kind == "consistency"
    rl = cfg.rl["ReMA"]
    assert rl.data.levels == (1, 2, 3) and rl.data.test_per_cell * len(rl.data.levels) == 30  # per family
    # SFT: the same budget on the same worked examples for both sides
    assert powered.sft_agent_steps(cfg.sft["SFT_VRP"]) * 2 == powered.sft_agent_steps(cfg.sft["SFT_ReMA"]) == 48
    # ReMA: one RA phase then one MTA phase, evaluated at both ends
    run = powered.run_config(cfg, "ReMA", 1, "/sft/adapters")
    assert run.loop.seed == 1 and run.model.init_adapters_from == "/sft/adapters"
    assert run.loop.eval_before is False and run.loop.eval_questions == 120
    assert powered.eval_steps(run) == [3, 6]
    assert [(s.trained, s.start, s.end) for s in powered.phase_spans(run)] == [
        (("reasoning",), 0, 3),
        (("meta_thinking",), 3, 6),
    ]
    assert powered.eval_steps(powered.run_config(cfg, "VRP_RL", 0, None)) == [6]
    # the consistency ablation is ReMA until its MTA phase: it starts from ReMA's step-3 checkpoint
    assert cfg.branches == {"ReMA_consistency": "ReMA"} and powered.branch_step(cfg, "ReMA_consistency") == 3
    assert run.checkpoint.keep_steps == (3,)
    assert powered.run_config(cfg, "ReMA_consistency", 1, None).checkpoint.keep_steps == ()
    rows = powered.plan(cfg, {})
    keep, total = powered.seeds_within_budget(cfg, rows, {})
    assert keep == list(cfg.seeds) and total < 150.0
    text = powered.format_plan(cfg, {})
    assert "all seeds fit" in text and "ReMA_consistency/seed2" in text


def test_the_old_module_path_reexports_the_api():
    from rema_jax.training import bootstrap
    from rema_jax.training import powered as old

    for name in powered.__all__:
        assert getattr(old, name) is getattr(powered, name), name
    assert old.stage_rl is bodies.stage_rl and bootstrap.StageError is StageError


def test_eval_cost_counts_the_sampler_batch_padding():
    import inspect

    from rema_jax.sampling import Sampler

    default = inspect.signature(Sampler.__init__).parameters["batch_buckets"].default
    assert tuple(default) == powered.SAMPLER_BATCH_BUCKETS
    assert [powered.eval_rows(n) for n in (1, 3, 32, 96, 120, 128, 130, 300)] == [1, 4, 32, 96, 128, 128, 130, 304]


def test_worked_examples_cover_the_preset_levels():
    from rema_jax.sft.worked import worked_example
    from rema_jax.tasks.builtin import builtin_split

    d = powered.load_powered_config(preset_raw()).sft["SFT_ReMA"].data
    train, test = builtin_split(
        d.train_per_cell, d.test_per_cell, seed=d.split_seed, families=d.families, levels=d.levels
    )
    level3 = [t for t in train if t.level == 3]
    assert len(level3) == 4 * d.train_per_cell
    for t in level3:
        assert worked_example(t).plan  # every level-3 question re-solves (raises otherwise)
    assert not {t.uid for t in train} & {t.uid for t in test}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.sft.SFT_VRP.data, "test_per_cell", 3), "SFT must use RL's split"),
        (lambda c: setattr(c.sft.SFT_VRP.loop, "epochs", 3), "the same budget on the same worked examples"),
        (lambda c: setattr(c.sft.SFT_ReMA.data, "examples_per_cell", 2), "the same budget on the same worked"),
        (lambda c: setattr(c.rl.ReMA.loop, "steps", 4), "share the held-out split and the RL budget"),
        (lambda c: setattr(c.rl.VRP_RL.data, "levels", (1, 2)), "SFT must use RL's split"),
        (lambda c: setattr(c, "heldout_questions", 121), "held-out questions"),
        (lambda c: setattr(c, "comparisons", (("ReMA", "MRP"),)), "comparisons"),
        (lambda c: setattr(c, "methods", ("ReMA", "VRP_RL")), "config.methods"),
        (lambda c: setattr(c.rl.ReMA.loop, "stepz", 3), "config.rl.ReMA.loop: unknown key"),
        (lambda c: setattr(c, "seedz", 3), "unknown key"),
        # branches: the two runs must be the same run up to the branch step
        (lambda c: setattr(c.rl.ReMA_consistency.loss, "clip_eps", 0.3), "may differ only in their reward"),
        (lambda c: setattr(c.rl.ReMA_consistency.reward, "correct_reward", 2.0), "nothing to share"),
        (lambda c: setattr(c.rl.ReMA.reward, "kind", "consistency"), "would be the same run"),
        (
            lambda c: [setattr(r.schedule, "kind", "simultaneous") for r in (c.rl.ReMA, c.rl.ReMA_consistency)],
            "nothing to share",
        ),
        (lambda c: setattr(c, "branches", {"ReMA": "ReMA_consistency"}), "must come before the branch"),
        (lambda c: setattr(c, "branches", {"ReMA_consistency": "VRP_RL"}), "same SFT stage"),
        (lambda c: setattr(c, "branches", {"ReMA_consistency": "MRP"}), "two different methods"),
        (
            lambda c: [setattr(r.checkpoint, "every", 2) for r in (c.rl.ReMA, c.rl.ReMA_consistency)],
            "does not save step 3",
        ),
    ],
)
def test_config_errors_name_the_problem(edit, message):
    raw = preset_raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        powered.load_powered_config(raw)


def test_eval_steps_cover_every_phase_boundary():
    raw = small_raw(steps=10, phase=2)
    raw.rl.ReMA.schedule.meta_thinking_steps = 3
    raw.rl.ReMA_consistency.schedule.meta_thinking_steps = 3
    cfg = powered.load_powered_config(raw)
    run = powered.run_config(cfg, "ReMA", 0, None)
    spans = [(s.trained[0], s.start, s.end) for s in powered.phase_spans(run)]
    assert spans == [("reasoning", 0, 2), ("meta_thinking", 2, 5), ("reasoning", 5, 7), ("meta_thinking", 7, 10)]
    assert run.loop.eval_every == 1  # gcd(2, 5, 7)
    assert {s for _, a, b in spans for s in (a, b)} - {0} <= set(powered.eval_steps(run))


# ------------------------------------------------------------------ the runner with stand-in stages
class FakeStages:
    """Stand-ins for the SFT / eval / RL stage bodies: they write the files the real ones write
    (adapters dir, eval JSONL with uid/subject/level/correct, metrics.jsonl) with seeded outcomes."""

    P = {"vrp": 0.35, "paper": 0.6, "consistency": 0.5}

    def __init__(self, fail_on=None):
        self.calls = collections.Counter()
        self.fail_on = fail_on

    def sft(self, config, workdir, progress):
        self.calls["sft"] += 1
        path = os.path.join(workdir, "adapters")
        os.makedirs(path, exist_ok=True)
        n = powered.sft_agent_steps(config)
        return {
            "adapters": path,
            "steps_per_agent": {r: n // len(config.loop.roles) for r in config.loop.roles},
            "agent_steps": n,
        }

    def _write_eval(self, config, path, p):
        from rema_jax.training.trainer import heldout_subset, load_tasks

        _, test = load_tasks(config)
        rng = np.random.default_rng([config.loop.seed, int(p * 1000), len(path)])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for t in heldout_subset(test, config.loop.eval_questions):
                f.write(
                    json.dumps(
                        {"uid": t.uid, "subject": t.subject, "level": t.level, "correct": bool(rng.random() < p)}
                    )
                    + "\n"
                )

    def eval(self, config, workdir, questions, tag):
        self.calls["eval"] += 1
        path = os.path.join(workdir, "eval", f"{tag}.jsonl")
        self._write_eval(config, path, 0.3)
        return {"eval_file": path}

    def rl(self, config, workdir, progress):
        self.calls["rl"] += 1
        os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
        for step in config.checkpoint.keep_steps:  # what a branch starts from
            os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)
        from rema_jax.config_utils import to_dict

        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(to_dict(config), f, default=str)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in range(config.loop.steps):
                trained = powered.phase_spans(config)  # the stand-in logs what the schedule trains
                phase = next(sp for sp in trained if sp.start <= step < sp.end)
                f.write(
                    json.dumps({"step": step + 1, "time/step_s": 2.0, "phase/trained": "+".join(phase.trained)}) + "\n"
                )
        if self.fail_on and workdir.endswith(self.fail_on):
            raise CheckpointError(f"{workdir}/checkpoints/1: truncated")
        p = self.P["vrp" if config.single_agent else config.reward.kind]
        for step in powered.eval_steps(config):
            self._write_eval(config, os.path.join(workdir, "eval", f"step_{step}.jsonl"), p + 0.02 * step)
        return {
            "steps": config.loop.steps,
            "resumed_from_step": None,
            "step_s_median": 2.0,
            "diagnostics": {"reasoning": {"reward_first": -0.5, "reward_last": 0.1, "frac_zero_variance_groups": 0.25}},
        }

    def install(self, monkeypatch):
        monkeypatch.setattr(bodies, "stage_sft", self.sft)
        monkeypatch.setattr(bodies, "stage_eval", self.eval)
        monkeypatch.setattr(bodies, "stage_rl", self.rl)


def test_runner_records_skips_and_reports(tmp_path, monkeypatch, capsys):
    cfg = powered.load_powered_config(small_raw(seeds=3, steps=4, phase=2))
    fake = FakeStages()
    fake.install(monkeypatch)
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    out = powered.run_powered(cfg, work, res, progress=False)
    assert fake.calls == {"sft": 2, "eval": 2, "rl": 9}

    for name in ("powered_experiment.md", "powered_experiment.json", "powered_accuracy.png", "powered_mechanism.png"):
        assert os.path.getsize(os.path.join(res, name)) > 0
    on_disk = json.load(open(os.path.join(res, "powered_experiment.json")))
    assert on_disk["seeds"] == [0, 1, 2] and on_disk["heldout_questions"] == 16
    assert len(on_disk["runs"]) == 9 and {r["method"] for r in on_disk["runs"]} == set(cfg.rl)
    for m, r in on_disk["methods"].items():
        for key in ("start", "final", "rl_minus_start"):
            ci = r[key]
            assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["level"] == 0.95
        assert r["final"]["seeds"] == 3 and r["final"]["questions"] == 16
        # the method's mean is the mean of its runs
        accs = [x["accuracy"] for x in on_disk["runs"] if x["method"] == m]
        assert r["final"]["estimate"] == pytest.approx(np.mean(accs))
    head = on_disk["comparisons"][0]
    assert (head["a"], head["b"]) == ("ReMA", "VRP_RL")
    assert "the paired difference ReMA − VRP_RL" in head["reading"] and "CI" in head["reading"]
    assert set(on_disk["table1"]) == {"VRP+SFT", "VRP_RL", "ReMA+SFT", "ReMA", "ReMA_consistency"}
    assert set(on_disk["table1"]["ReMA"]) == {"arithmetic", "linear_equation", "polynomial", "word_problem"}
    assert "Level 2 after SFT" in on_disk["hard_level"]
    mech = on_disk["mechanism"]
    assert set(mech) == {"ReMA", "ReMA_consistency"}
    phases = mech["ReMA"]["phases"]
    assert [(p["trained"], p["start"], p["end"]) for p in phases] == [("reasoning", 0, 2), ("meta_thinking", 2, 4)]
    mta = phases[1]
    assert len(mta["per_seed"]) == 3 and {"start_mean", "end_mean", "delta"} <= set(mta)
    assert mta["only_this_agent_updated"] is True
    assert mta["delta"]["estimate"] == pytest.approx(mta["end_mean"]["estimate"] - mta["start_mean"]["estimate"])
    assert any("MTA phase" in r and "RA frozen" in r for r in on_disk["readings"])
    md = open(os.path.join(res, "powered_experiment.md")).read()
    for needle in (
        "| ReMA − VRP_RL |",
        "| Task family | VRP+SFT | VRP_RL | ReMA+SFT | ReMA | ReMA_consistency |",
        "## Mechanism",
        "| ReMA | 1 | meta_thinking | yes | 2→4 |",
        "![accuracy](powered_accuracy.png)",
    ):
        assert needle in md, needle
    # the stage records: relative paths, eval files at every phase boundary
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert stages["ReMA/seed1"]["eval_files"] == {
        "2": "ReMA/seed1/eval/step_2.jsonl",
        "4": "ReMA/seed1/eval/step_4.jsonl",
    }
    assert stages["SFT_ReMA"]["adapters"] == "SFT_ReMA/adapters"

    # a re-run redoes nothing and reports the same numbers
    capsys.readouterr()
    again = powered.run_powered(cfg, work, res, progress=False)
    assert fake.calls == {"sft": 2, "eval": 2, "rl": 9}
    assert capsys.readouterr().out.count("skipped") == 13
    assert again["methods"] == out["methods"] and again["comparisons"] == out["comparisons"]


def test_a_failed_stage_is_named_and_the_rerun_continues(tmp_path, monkeypatch):
    cfg = powered.load_powered_config(small_raw(seeds=2))
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    fake = FakeStages(fail_on=os.path.join("ReMA", "seed1"))
    fake.install(monkeypatch)
    with pytest.raises(
        StageError,
        match=r"stage 'ReMA/seed1' failed while writing .*run/ReMA/seed1 "
        r"\(last file written: .*metrics.jsonl\): CheckpointError",
    ):
        powered.run_powered(cfg, work, res, progress=False)
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert "ReMA/seed1" not in stages and "VRP_RL/seed1" in stages and "ReMA_consistency/seed1" not in stages
    assert stages["_partial"]["ReMA/seed1"] >= 0
    assert not os.path.exists(os.path.join(res, "powered_experiment.json"))

    fake2 = FakeStages()
    fake2.install(monkeypatch)
    out = powered.run_powered(cfg, work, res, progress=False)
    assert fake2.calls == {"rl": 2}  # ReMA/seed1 and ReMA_consistency/seed1 only
    assert out["seeds"] == [0, 1]
    assert (
        "_partial" not in json.load(open(os.path.join(work, "stages.json")))
        or "ReMA/seed1" not in json.load(open(os.path.join(work, "stages.json")))["_partial"]
    )


def test_a_changed_config_is_refused_not_mixed(tmp_path, monkeypatch):
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    FakeStages(fail_on=os.path.join("ReMA", "seed0")).install(monkeypatch)
    with pytest.raises(StageError):
        powered.run_powered(powered.load_powered_config(small_raw(seeds=2)), work, res, progress=False)
    FakeStages().install(monkeypatch)
    raw = small_raw(seeds=2)
    raw.rl.ReMA.loss.clip_eps = 0.3  # its half-done run has checkpoints of the old config
    raw.rl.ReMA_consistency.loss.clip_eps = 0.3  # (the branch may differ from ReMA only in its reward)
    with pytest.raises(
        ConfigError,
        match=r"stage ReMA/seed0: the checkpoint in .*ReMA/seed0 was made with a "
        r"different config \(loss.clip_eps: 0.2 → 0.3\)",
    ):
        powered.run_powered(powered.load_powered_config(raw), work, res, progress=False)
    raw = small_raw(seeds=2)
    raw.rl.VRP_RL.loss.clip_eps = 0.3  # a finished stage's record
    with pytest.raises(
        ConfigError,
        match=r"stage VRP_RL/seed0: its record in .*stages.json was made with a "
        r"different config \(rl.loss.clip_eps: 0.2 → 0.3\)",
    ):
        powered.run_powered(powered.load_powered_config(raw), work, res, progress=False)
    # more seeds, fewer seeds or another budget reuse every finished stage
    raw = small_raw(seeds=1)
    out = powered.run_powered(powered.load_powered_config(raw), work, res, progress=False)
    assert out["seeds"] == [0]


def test_a_record_older_than_a_new_config_field_is_reused_when_the_field_is_off(tmp_path, monkeypatch):
    cfg = powered.load_powered_config(small_raw(seeds=1))
    FakeStages().install(monkeypatch)
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    powered.run_powered(cfg, work, res, progress=False)
    path = os.path.join(work, "stages.json")

    def drop(key):
        done = json.load(open(path))
        del done["VRP_RL/seed0"]["config"]["rl"]["checkpoint"][key]
        json.dump(done, open(path, "w"))

    drop("keep_steps")  # as written before checkpoint.keep_steps existed; () now: the same behaviour
    powered.run_powered(cfg, work, res, progress=False)
    drop("keep_last")  # a set value the record lacks is a difference
    with pytest.raises(ConfigError, match=r"VRP_RL/seed0.*rl.checkpoint.keep_last: None → 2"):
        powered.run_powered(cfg, work, res, progress=False)


def test_a_report_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    cfg = powered.load_powered_config(small_raw(seeds=2))
    FakeStages().install(monkeypatch)
    res = tmp_path / "results"
    res.mkdir()
    (res / "powered_accuracy.png").mkdir()  # a directory where the PNG goes
    with pytest.raises(StageError, match=r"stage 'report' failed while writing .*powered_accuracy.png"):
        powered.run_powered(cfg, str(tmp_path / "run"), str(res), progress=False)


def test_the_time_budget_drops_whole_seed_groups(tmp_path, monkeypatch, capsys):
    raw = small_raw(seeds=3)
    raw.costs = dict(sft_step_s=0.0, rl_step_s=30.0, eval_row_s=0.0, stage_overhead_s=0.0)
    raw.time_budget_min = 7.0  # RL run: 2 steps × 30 s = 1 min; a seed group (3 runs) = 3 min
    cfg = powered.load_powered_config(raw)
    text = powered.format_plan(cfg, {})
    assert re.search(r"ReMA/seed2\s+skip", text) and "seeds [2] do not fit" in text
    fake = FakeStages()
    fake.install(monkeypatch)
    out = powered.run_powered(cfg, str(tmp_path / "run"), str(tmp_path / "res"), progress=False)
    assert fake.calls["rl"] == 6 and out["seeds"] == [0, 1] and out["seeds_skipped"] == [2]
    assert any("only 2 of 3 planned seeds" in r and "the same 16 held-out questions" in r for r in out["readings"])
    md = open(os.path.join(tmp_path / "res", "powered_experiment.md")).read()
    assert "[2] skipped by the 7-min budget" in md


def test_cli_plan_and_flag_errors(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "experiment.py"),
        "--preset=powered",
        f"--workdir={tmp_path / 'w'}",
        "--compilation_cache=off",
    ]
    proc = subprocess.run(
        cmd + ["--plan", "--seeds=4", "--phase_steps=2"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "seeds [0, 1, 2, 3]" in proc.stdout and "ReMA_consistency/seed3" in proc.stdout
    assert "MTA phases [(2, 4)]" in proc.stdout and "total" in proc.stdout
    assert not os.path.exists(tmp_path / "w")  # --plan runs nothing
    proc = subprocess.run(cmd + ["--eval_every=2"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "error: --eval_every does not apply to --preset=powered" in proc.stderr
    proc = subprocess.run(
        cmd + ["--plan", "--sft_override=loop.epochs=3"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr  # both SFTs changed alike: still the same budget
    proc = subprocess.run(
        cmd + ["--plan", "--eval_questions=200"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2 and "held-out questions" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the real stages on a tiny model
@pytest.mark.slow
def test_preset_end_to_end_on_a_tiny_model_with_a_kill(smollm2_gguf, tmp_path, monkeypatch):
    """2 SFTs, 2 SFT evals, 3 methods × 2 seeds × 2 RL steps (RA phase step 0→1, MTA phase 1→2) on a
    random 2-layer model; ReMA/seed1 is killed after one RL step and resumes from its checkpoint."""
    from rema_jax.training import loop as loop_lib

    cfg = powered.load_powered_config(small_raw(seeds=2, steps=2, phase=1, levels=(1,)))
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    real_train = loop_lib.train

    def killed_in_remа_seed1(config, workdir, **kw):
        if workdir.endswith(os.path.join("ReMA", "seed1")) and not os.path.exists(os.path.join(workdir, "checkpoints")):
            real_train(config, workdir, max_steps=1, **kw)
            raise KeyboardInterrupt  # as if the job were stopped
        return real_train(config, workdir, **kw)

    monkeypatch.setattr(loop_lib, "train", killed_in_remа_seed1)
    with pytest.raises(KeyboardInterrupt):
        powered.run_powered(cfg, work, res, progress=False)
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert {"SFT_VRP", "SFT_ReMA", "VRP_RL/seed0", "ReMA/seed0", "VRP_RL/seed1"} <= set(stages)
    assert "ReMA/seed1" not in stages
    sft_mtime = os.path.getmtime(os.path.join(work, "SFT_ReMA", "summary.json"))

    out = powered.run_powered(cfg, work, res, progress=False)
    assert os.path.getmtime(os.path.join(work, "SFT_ReMA", "summary.json")) == sft_mtime  # not redone
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert stages["ReMA/seed1"]["resumed_from_step"] == 1
    assert stages["VRP_RL/seed0"]["resumed_from_step"] is None
    rl_cfg = json.load(open(os.path.join(work, "ReMA", "seed1", "config.json")))
    assert rl_cfg["loop"]["seed"] == 1 and rl_cfg["loop"]["eval_every"] == 1
    assert rl_cfg["model"]["init_adapters_from"] == os.path.join(work, "SFT_ReMA", "adapters")
    assert out["seeds"] == [0, 1] and out["heldout_questions"] == 8
    for m in ("VRP_RL", "ReMA", "ReMA_consistency"):
        ci = out["methods"][m]["final"]
        assert ci["low"] <= ci["estimate"] <= ci["high"]
    phases = out["mechanism"]["ReMA"]["phases"]
    assert [(p["trained"], p["start"], p["end"]) for p in phases] == [("reasoning", 0, 1), ("meta_thinking", 1, 2)]
    # the MTA phase's start is the RA phase's end: one evaluation file, read twice
    assert phases[1]["start_mean"] == phases[0]["end_mean"]
    assert phases[0]["only_this_agent_updated"] is phases[1]["only_this_agent_updated"] is True
    for name in ("powered_experiment.md", "powered_experiment.json", "powered_accuracy.png", "powered_mechanism.png"):
        assert os.path.exists(os.path.join(res, name))


# ------------------------------------------------------------------ branches (the consistency ablation)
def test_the_runner_starts_a_branch_from_its_parents_checkpoint(tmp_path, monkeypatch):
    cfg = powered.load_powered_config(small_raw(seeds=1, steps=2, phase=1))
    FakeStages().install(monkeypatch)
    work, res = str(tmp_path / "run"), str(tmp_path / "results")
    out = powered.run_powered(cfg, work, res, progress=False)
    child = os.path.join(work, "ReMA_consistency", "seed0")
    assert json.load(open(os.path.join(child, "branched_from.json"))) == {
        "method": "ReMA",
        "step": 1,
        "directory": os.path.join("ReMA", "seed0"),
    }
    assert os.path.isdir(os.path.join(child, "checkpoints", "1"))
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert stages["ReMA_consistency/seed0"]["branched_from"]["step"] == 1
    assert stages["ReMA_consistency/seed0"]["config"]["branch"] == {"from": "ReMA", "step": 1}
    assert out["branches"] == {"ReMA_consistency": {"from": "ReMA", "step": 1}}
    assert "ReMA_consistency's runs are ReMA's up to step 1" in open(os.path.join(res, "powered_experiment.md")).read()
    # the parent must have kept the checkpoint
    import shutil

    shutil.rmtree(os.path.join(work, "ReMA", "seed0", "checkpoints", "1"))
    shutil.rmtree(child)
    done = json.load(open(os.path.join(work, "stages.json")))
    del done["ReMA_consistency/seed0"]
    json.dump(done, open(os.path.join(work, "stages.json"), "w"))
    with pytest.raises(StageError, match=r"ReMA_consistency/seed0.*checkpoint at step 1.*keep_steps=1"):
        powered.run_powered(cfg, work, res, progress=False)


@pytest.mark.slow  # ~70 s; resume exactness is in the default run (tests/test_trainer.py)
def test_a_branch_equals_the_run_from_scratch_bit_for_bit(smollm2_gguf, tmp_path):
    """A branch resumed from its parent's checkpoint at the end of the RA phase ends where the same
    run from step 0 ends: same final trees, same metrics after the branch, same evaluations. The
    rewards are stand-ins (a random model's real ones are all equal, so nothing would train): the same
    RA rewards for both methods, different MTA rewards (what the consistency ablation changes)."""
    import orbax.checkpoint as ocp

    from rema_jax.experiments.powered import runner
    from rema_jax.rollout import META_THINKING
    from rema_jax.training import loop as loop_lib

    def rewards(mta_offset):
        def override(exp):
            for role in exp.rewards:
                i = np.arange(len(exp.rewards[role])) + (mta_offset if role == META_THINKING else 0)
                exp.rewards[role] = (i % 2 == 0).astype(np.float32)
            return exp

        return override

    cfg = powered.load_powered_config(small_raw(seeds=1, steps=2, phase=1, levels=(1,), test_per_cell=1))
    work = str(tmp_path / "run")

    def run(method, d):
        c = powered.run_config(cfg, method, 0, None)
        return loop_lib.train(c, d, progress=False, reward_override=rewards(int(method != "ReMA")))

    parent = os.path.join(work, "ReMA", "seed0")
    run("ReMA", parent)
    scratch = str(tmp_path / "scratch")
    run("ReMA_consistency", scratch)
    stage = next(s for s in powered.stage_list(cfg) if s.name == "ReMA_consistency/seed0")
    runner._start_branch(cfg, stage, work)
    branched = os.path.join(work, "ReMA_consistency", "seed0")
    summary = run("ReMA_consistency", branched)
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2

    def tree(d, step):
        return ocp.PyTreeCheckpointer().restore(os.path.join(d, "checkpoints", str(step), "state"))

    assert jax_tree_equal(tree(scratch, 2), tree(branched, 2))
    # not vacuous: the MTA phase moved the trees, and differently under the other MTA reward
    assert not jax_tree_equal(tree(scratch, 2), tree(parent, 2))
    assert not jax_tree_equal(tree(parent, 1), tree(parent, 2))

    def records(d):
        out = {}
        for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))):
            out[r["step"]] = {
                k: v
                for k, v in r.items()
                if not k.startswith(("time/", "throughput/", "branch/", "memory/"))
                and "compile" not in k  # process state
            }
        return out

    ra, rb = records(scratch), records(branched)
    assert ra[2] == rb[2] and ra[2]["phase/trained"] == META_THINKING
    not_mta = lambda r: {k: v for k, v in r.items() if not k.startswith(META_THINKING)}  # noqa: E731
    assert not_mta(ra[1]) == not_mta(rb[1])  # step 1 is the parent's record: the RA's part is the same
    for step in (1, 2):
        name = os.path.join("eval", f"step_{step}.jsonl")
        assert open(os.path.join(scratch, name)).read() == open(os.path.join(branched, name)).read()


def jax_tree_equal(a, b) -> bool:
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
