"""benchmarks/rl_step.py (the plain vs the default training passes over real trainer steps): its steady-state rule, and,
marked slow, the whole script on a tiny random model (two child processes, ~1 min on 2 cores)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("rl_step", os.path.join(REPO, "benchmarks", "rl_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _step(t, compiles):
    """A step whose three phases took ``t`` s each; ``compiles``: {phase: count}."""
    return {"rollout": t, "prepare": t, "update": t, "step": 3 * t, "compiles": compiles}


def test_steady_state_uses_the_phases_that_compiled_in_neither_variant():
    bench = _bench()
    off = [_step(10, {"rollout": 9, "prepare": 3, "update": 5}), _step(2, {}), _step(4, {"update": 1}), _step(6, {})]
    on = [_step(8, {"rollout": 9, "prepare": 3, "update": 5}), _step(1, {}), _step(2, {}), _step(3, {"update": 2})]
    st = bench.steady_state({"off": off, "on": on})
    # update compiled in step 3 (off) and step 4 (on): only step 2 counts for it, in both variants
    assert st["off"]["cells"] == {"rollout": [2, 3, 4], "prepare": [2, 3, 4], "update": [2]}
    assert st["off"]["update"] == 2 and st["on"]["update"] == 1
    assert st["off"]["rollout"] == 4 and st["on"]["rollout"] == 2  # mean of steps 2-4
    assert st["off"]["step"] == 4 + 4 + 2 and st["on"]["step"] == 2 + 2 + 1
    # a phase that compiled in every step has no steady figure, and neither has the whole step
    st = bench.steady_state({"off": [_step(1, {"update": 1}), _step(1, {"update": 1})]})
    assert st["off"]["update"] is None and st["off"]["step"] is None and st["off"]["prepare"] == 1


def test_milliseconds_of_compiles_do_not_make_a_phase_unsteady():
    """A rollout that recompiled two small helpers (0.04 s of its 20 s) is a steady cell; one that
    spent 8 of its 26 s compiling is not."""
    bench = _bench()
    helpers = {**_step(20, {"rollout": 2}), "compile_s": {"rollout": 0.04}}
    heavy = {**_step(26, {"rollout": 6}), "compile_s": {"rollout": 8.0}}
    st = bench.steady_state({"off": [heavy, helpers], "on": [heavy, helpers]})
    assert st["off"]["cells"]["rollout"] == [2] and st["off"]["rollout"] == 20


@pytest.mark.slow
def test_the_benchmark_runs_both_variants_and_prints_json(benchmark_json):
    out, stdout = benchmark_json("benchmarks/rl_step.py", "--tiny", "--steps", "2")
    assert set(out["variants"]) == {"off", "on"} and out["cpu"]
    assert set(out["speedup_by_phase"]) == {"rollout", "prepare", "update", "step"}
    assert out["speedup_all_steps"] > 0
    assert out["peak_rss_mb"] > 100
    for v in out["variants"].values():
        assert len(v["steps"]) == 2 and v["steps"][0]["compiles"]["update"] > 0  # attributed to its phase
        assert v["steps"][0]["compiles"]["rollout"] > 0
    assert "speedup (steady whole step, off / on)" in stdout
