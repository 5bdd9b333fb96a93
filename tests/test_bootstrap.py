"""The bootstrap job (base eval → SFT → RL) on a tiny random model with the real tokenizer:
config cross-checks, the files and numbers it leaves, stage-by-stage resume, and failures that
name the stage."""

import json
import os
import re
import sys

import pytest

from rema_jax.config_utils import ConfigError
from rema_jax.models import CheckpointError
from rema_jax.training import bootstrap as boot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}


def default_raw():
    sys.path.insert(0, REPO)
    from configs import default

    return default.get_config()


def tiny_raw():
    """configs/default.py shrunk: 2 SFT steps per agent, 2 RL steps, 8 held-out questions."""
    c = default_raw()
    for stage in (c.sft, c.rl):
        stage.model.random_init = TINY
        stage.adapter.rank = 4
        stage.adapter.alpha = 8.0
        stage.data.levels = (1,)
        stage.data.train_per_cell = 3
        stage.data.test_per_cell = 2
    c.sft.data.examples_per_cell = 1
    c.sft.loop.epochs = 1
    c.sft.loop.max_seq_len = 256
    c.sft.model.max_cache_len = 256
    c.rl.rollout.max_new_tokens = 8
    c.rl.loop.steps = 2
    c.rl.loop.questions_per_step = 2
    c.rl.schedule.reasoning_steps = 1
    c.rl.schedule.meta_thinking_steps = 1
    c.heldout_questions = 8
    return c


def test_default_config_is_a_valid_bootstrap():
    raw = default_raw()
    assert boot.is_bootstrap_config(raw)
    cfg = boot.load_bootstrap_config(raw)
    assert cfg.heldout_questions >= 48 and cfg.rl.loop.steps > 0
    assert cfg.rl.model.source == cfg.sft.model.source == "smollm2-135m"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.sft.data, "test_per_cell", 4), "SFT must use RL's split"),
        (lambda c: setattr(c.sft.data, "split_seed", 3), "SFT must use RL's split"),
        (lambda c: setattr(c.sft.adapter, "rank", 8), "kind, rank, alpha and targets must match"),
        (lambda c: setattr(c, "heldout_questions", 500), "held-out questions"),
        (lambda c: setattr(c.rl.model, "init_adapters_from", "/x"), "leave unset"),
        (lambda c: setattr(c.rl.loop, "stepz", 3), "config.rl.loop: unknown key"),
        (lambda c: setattr(c.sft.loop, "roles", ("meta_thinking",)), "does not train every RL agent"),
    ],
)
def test_bootstrap_config_errors_name_the_field(edit, message):
    raw = default_raw()
    raw.unlock() if hasattr(raw, "unlock") else None
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        boot.load_bootstrap_config(raw)


def test_bootstrap_runs_resumes_and_reports(smollm2_gguf, tmp_path, capsys):
    cfg = boot.load_bootstrap_config(tiny_raw())
    work = str(tmp_path / "run")
    summary = boot.run_bootstrap(cfg, work, progress=False)

    acc = summary["heldout_accuracy"]
    assert set(acc) == {"base", "sft", "rl"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert summary["heldout_questions"] == 8
    assert set(summary["seconds"]) == {"base", "sft", "rl", "total"}
    on_disk = json.load(open(os.path.join(work, "summary.json")))
    assert on_disk["heldout_accuracy"] == acc
    # the three evaluations ran on the same questions, in the same order
    ids = []
    for path in ("base/eval/base.jsonl", "rl/eval/step_0.jsonl", "rl/eval/step_2.jsonl"):
        rows = [json.loads(l) for l in open(os.path.join(work, path))]
        ids.append([r.get("uid", r.get("question")) for r in rows])
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 8
    # RL started from the SFT adapters the SFT stage wrote
    rl_cfg = json.load(open(os.path.join(work, "rl", "config.json")))
    assert rl_cfg["model"]["init_adapters_from"] == os.path.join(work, "sft", "adapters")
    for agent in ("meta_thinking", "reasoning"):
        assert os.path.isdir(os.path.join(work, "sft", "adapters", agent))
    diag = summary["rl_diagnostics"]
    assert set(diag) == {"meta_thinking", "reasoning"}
    assert sum(d["update_steps"] for d in diag.values()) == 2  # one RA and one MTA update
    assert os.path.exists(os.path.join(work, "bootstrap.png"))
    out = capsys.readouterr().out
    assert "held-out accuracy (8 questions, greedy)" in out and "sft" in out

    # a re-run redoes nothing: every stage is skipped, the summary is the same
    mtime = os.path.getmtime(os.path.join(work, "sft", "summary.json"))
    again = boot.run_bootstrap(cfg, work, progress=False)
    assert again["heldout_accuracy"] == acc and again["seconds"] == summary["seconds"]
    assert os.path.getmtime(os.path.join(work, "sft", "summary.json")) == mtime
    assert capsys.readouterr().out.count("skipped") == 3


@pytest.mark.slow  # ~40 s: keeps the default suite under 15 min; run with -m slow
def test_a_failed_stage_is_named_and_the_rerun_continues(smollm2_gguf, tmp_path, monkeypatch):
    cfg = boot.load_bootstrap_config(tiny_raw())
    work = str(tmp_path / "run")
    from rema_jax.training import loop as loop_lib

    real_train = loop_lib.train

    def killed_after_one_step(config, workdir, **kw):
        real_train(config, workdir, max_steps=1, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(loop_lib, "train", killed_after_one_step)
    with pytest.raises(OSError, match="disk full") as e:  # unexpected: type and traceback kept, plus a note
        boot.run_bootstrap(cfg, work, progress=False)
    assert any(re.search(r"stage 'rl' failed while writing .*run/rl$", n) for n in e.value.__notes__)

    def bad_checkpoint(config, workdir, **kw):
        raise CheckpointError("rl/checkpoints/1: truncated")

    monkeypatch.setattr(loop_lib, "train", bad_checkpoint)  # a user error: one clear message
    with pytest.raises(boot.StageError, match=r"stage 'rl' failed while writing .*run/rl: CheckpointError: rl/"):
        boot.run_bootstrap(cfg, work, progress=False)
    stages = json.load(open(os.path.join(work, "stages.json")))
    assert set(stages) == {"base", "sft"}

    monkeypatch.setattr(loop_lib, "train", real_train)
    summary = boot.run_bootstrap(cfg, work, progress=False)
    assert summary["rl_steps"] == 2
    rl_summary = json.load(open(os.path.join(work, "rl", "summary.json")))
    assert rl_summary["resumed_from_step"] == 1  # RL continued from its checkpoint, SFT was not redone


def test_train_py_reports_a_bad_bootstrap_config_in_one_line(tmp_path):
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "train.py"),
            "--config=configs/default.py",
            "--config.sft.data.test_per_cell=4",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: invalid config" in proc.stderr and "SFT must use RL's split" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "base")  # failed before any stage started
