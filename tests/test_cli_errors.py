"""Entry points: user-facing errors are one ``error: <message>`` line (exit 2), never a traceback;
``launch/experiment.py --override`` parses values by the existing field's type, like ``--config.x``.

The subprocess tests stop on errors that fire before any model is loaded, so they take seconds.
"""

import importlib
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from rema_jax import cli
from rema_jax.config_utils import ConfigError
from rema_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the last stderr line is ``error: ...`` holding every needle."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-4000:]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


# ------------------------------------------------------------------ the shared base class
@pytest.mark.parametrize(
    "module,name",
    [
        ("rema_jax.config_utils", "ConfigError"),
        ("rema_jax.models.config", "ModelConfigError"),
        ("rema_jax.models.config", "CheckpointError"),
        ("rema_jax.models.hub", "ModelSourceError"),
        ("rema_jax.tasks.loaders", "BadRecordError"),
        ("rema_jax.tasks.tfds_loader", "TFDSUnavailableError"),
        ("rema_jax.sharding.memory", "MemoryPlanError"),
        ("rema_jax.sharding.mesh", "MeshConfigError"),
        ("rema_jax.sharding.rules", "ShardingRulesError"),
        ("rema_jax.sharding.distributed", "DistributedConfigError"),
        ("rema_jax.sft.worked", "WorkedExampleError"),
        ("rema_jax.training.trainer", "NonFiniteUpdateError"),
        ("rema_jax.rewards.math_grading", "GradingError"),
    ],
)
def test_user_facing_errors_share_the_base_class(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, UserError), cls.__mro__


def test_run_main_prints_user_errors_and_keeps_other_tracebacks(capsys):
    def bad_input():
        raise ConfigError("config.loop.steps: must be >= 1, got 0")

    with pytest.raises(SystemExit) as e:
        cli.run_main(bad_input, use_absl=False)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config.loop.steps: must be >= 1, got 0\n"

    with pytest.raises(SystemExit) as e:  # a missing input file is the user's too
        cli.run_main(lambda: open("/nonexistent/tasks.jsonl"), use_absl=False)
    assert e.value.code == 2 and "/nonexistent/tasks.jsonl" in capsys.readouterr().err

    def bug():
        raise KeyError("an internal bug")

    with pytest.raises(KeyError):  # unexpected errors propagate (and keep their traceback)
        cli.run_main(bug, use_absl=False)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: 0, use_absl=False)
    assert e.value.code == 0


# ------------------------------------------------------------------ item 7: typed overrides
def _config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "adapter": {"kind": "lora", "rank": 16, "alpha": 32.0, "targets": ("q_proj", "k_proj")},
            "model": {"source": "smollm2-135m", "init_adapters_from": ml_collections.config_dict.placeholder(str)},
            "loop": {"seed": 0, "eval_before": True, "steps": 8},
            "reward": {"kind": "paper"},
        }
    )


def test_overrides_parse_by_field_type():
    c = cli.apply_overrides(
        _config(),
        [
            "adapter.kind=full",  # strings starting with t/f/n stay strings
            "model.source=facebook/opt-125m",
            "reward.kind=none",
            "model.init_adapters_from=/runs/sft/adapters",
            "loop.eval_before=false",  # bool
            "loop.seed=3",  # int
            "adapter.alpha=8",  # float field: "8" -> 8.0
            "adapter.rank=4",
        ],
    )
    assert c.adapter.kind == "full" and c.model.source == "facebook/opt-125m" and c.reward.kind == "none"
    assert c.model.init_adapters_from == "/runs/sft/adapters"
    assert c.loop.eval_before is False
    assert c.loop.seed == 3 and isinstance(c.loop.seed, int)
    assert c.adapter.alpha == 8.0 and isinstance(c.adapter.alpha, float)
    assert c.adapter.targets == ("q_proj", "k_proj")  # untouched
    # tuples: a Python literal, or the key repeated (as --config.x does)
    assert cli.apply_overrides(_config(), ["adapter.targets=('q_proj', 'v_proj')"]).adapter.targets == (
        "q_proj",
        "v_proj",
    )
    assert cli.apply_overrides(_config(), ["adapter.targets=o_proj", "adapter.targets=up_proj"]).adapter.targets == (
        "o_proj",
        "up_proj",
    )


@pytest.mark.parametrize(
    "item,needles",
    [
        ("loop.sed=3", ["--override=loop.sed=3", "sed", 'Did you mean "seed"']),
        ("optim.seed=3", ["--override=optim.seed=3", "optim"]),
        ("loop.seed=abc", ["--override=loop.seed=abc", "loop.seed", "abc"]),
        ("loop.eval_before=maybe", ["--override=loop.eval_before=maybe", "loop.eval_before"]),
        ("adapter.alpha=x", ["--override=adapter.alpha=x", "adapter.alpha"]),
        ("=3", ["--override==3"]),
    ],
)
def test_bad_override_names_the_key(item, needles):
    with pytest.raises(ConfigError) as e:
        cli.apply_overrides(_config(), ["loop.steps=2", item])
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert "Traceback" not in str(e.value)


# ------------------------------------------------------------------ item 11: each entry point
def _config_file(tmp_path, body: str) -> pathlib.Path:
    path = tmp_path / "bad_config.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_experiment_overrides_strings_and_rejects_a_bad_key(tmp_path):
    proc = _run(
        "experiment.py",
        f"--workdir={tmp_path / 'exp'}",
        "--nosft",
        "--override=adapter.kind=full",
        "--override=model.source=facebook/opt-125m",
        "--override=loop.sed=3",
    )
    _assert_user_error(proc, "--override=loop.sed=3", 'Did you mean "seed"')
    # string overrides reach the run: it stops where the overridden model source is loaded
    proc = _run(
        "experiment.py",
        f"--workdir={tmp_path / 'exp'}",
        "--nosft",
        "--override=adapter.kind=full",
        "--override=model.source=/nonexistent/model_dir",
        "--override=loop.eval_before=false",
    )
    _assert_user_error(proc, "/nonexistent/model_dir")


def test_experiment_checks_every_stage_config_before_loading_a_model(tmp_path):
    proc = _run(
        "experiment.py", f"--workdir={tmp_path / 'exp'}", "--override=adapter.kind=full", "--sft_override=loop.epochz=1"
    )
    _assert_user_error(proc, "--sft_override=loop.epochz=1")
    proc = _run("experiment.py", f"--workdir={tmp_path / 'exp'}", "--nosft", "--override=loop.steps=0")
    _assert_user_error(proc, "run VRP_RL", "config.loop: steps must be >= 1")


def test_train_bad_config_and_bad_model_source(tmp_path):
    cfg = _config_file(
        tmp_path,
        """\
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({"loop": {"stepz": 3}})
        """,
    )
    proc = _run("train.py", f"--config={cfg}", f"--workdir={tmp_path / 'run'}")
    _assert_user_error(proc, str(cfg), "config.loop", "stepz")

    cfg = _config_file(
        tmp_path,
        """\
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({
                "model": {"source": "/nonexistent/model_dir"},
                "rollout": {"max_prompt_len": 200, "max_new_tokens": 32, "num_samples": 2}})
        """,
    )
    proc = _run("train.py", f"--config={cfg}", f"--workdir={tmp_path / 'run'}")
    _assert_user_error(proc, "/nonexistent/model_dir")


def test_train_bad_command_line_flags(tmp_path):
    cfg = _config_file(
        tmp_path,
        """\
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({"loop": {"steps": 3}})
        """,
    )
    workdir = f"--workdir={tmp_path / 'run'}"
    proc = _run("train.py", f"--config={cfg}", "--config.loop.stepz=4", workdir)
    _assert_user_error(proc, "--config.loop.stepz=4", "'stepz' is unknown", 'Did you mean "steps"')
    proc = _run("train.py", f"--config={cfg}", "--config.loop.steps=abc", workdir)
    _assert_user_error(proc, "--config.loop.steps=abc", "invalid literal")
    proc = _run("train.py", f"--config={tmp_path / 'missing.py'}", workdir)
    _assert_user_error(proc, str(tmp_path / "missing.py"))


def test_sft_bad_config(tmp_path):
    cfg = _config_file(
        tmp_path,
        """\
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({"loop": {"epochs": "two"}})
        """,
    )
    proc = _run("sft.py", f"--config={cfg}", f"--workdir={tmp_path / 'run'}")
    _assert_user_error(proc, str(cfg), "loop.epochs")


def test_eval_malformed_task_file_and_missing_data(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": \n')
    common = ["--config=configs/eval_default.py", f"--workdir={tmp_path / 'eval'}", "--config.progress=false"]
    proc = _run("eval.py", *common, f"--config.benchmarks=math500={bad}")
    _assert_user_error(proc, f"{bad}:2", "bad JSON")
    missing = tmp_path / "nowhere" / "test.jsonl"
    proc = _run("eval.py", *common, f"--config.benchmarks=math500={missing}")
    _assert_user_error(proc, str(missing))


def test_rollout_bad_model_source(tmp_path):
    proc = _run("rollout.py", "--model=/nonexistent/model_dir")
    _assert_user_error(proc, "/nonexistent/model_dir")
