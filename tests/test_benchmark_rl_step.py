"""benchmarks/rl_step.py (share_prefix off vs on over real trainer steps): its steady-state rule, and,
marked slow, the whole script on a tiny random model (two child processes, ~1 min on 2 cores)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("rl_step", os.path.join(REPO, "benchmarks", "rl_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _step(t, compiles):
    return {"rollout": t, "prepare": t, "update": t, "step": 3 * t, "compiles": compiles}


def test_steady_state_skips_the_steps_that_compiled():
    bench = _bench()
    steady = bench._steady([_step(10, 40), _step(2, 0), _step(9, 3), _step(4, 0)])
    assert steady["step"] == 9 and steady["steps_used"] == 2  # median of 6 and 12
    # every step compiled: all but the first
    steady = bench._steady([_step(10, 40), _step(2, 1), _step(4, 1)])
    assert steady["update"] == 3 and steady["steps_used"] == 2


@pytest.mark.slow
def test_the_benchmark_runs_both_variants_and_prints_json():
    proc = subprocess.run(
        [sys.executable, "benchmarks/rl_step.py", "--tiny", "--steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["variants"]) == {"off", "on"} and out["cpu"]
    assert out["speedup"] > 0 and set(out["speedup_by_phase"]) == {"rollout", "prepare", "update", "step"}
    assert out["peak_rss_mb"] > 100
    for v in out["variants"].values():
        assert len(v["steps"]) == 2 and v["steps"][0]["compiles"] > 0
    assert "speedup (steady whole step, off / on)" in proc.stdout
