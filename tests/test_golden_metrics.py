"""Behaviour guard for refactors: the first 3 steps' ``metrics.jsonl`` of two shipped RL setups, shrunk
to a tiny random model, must equal the records in ``tests/golden/`` (recorded before the trainer was
split into layout / rollout worker / learner).

  * ``default_rl``: the ``rl`` section of configs/default.py (single-turn ReMA from SFT adapters, LoRA,
    alternating RA / MTA phases of 2 steps, so the 3 steps cover both agents);
  * ``paper_multi_turn``: configs/paper_multi_turn.py (one shared model, both roles trained together
    on multi-turn conversations, 2 mini-batches).

Rewards are replaced by 1, 0, 1, 0, … per group (a random model's real rewards are all equal, so the
updates would be zero and the comparison weak). ``time/``, ``throughput/`` and ``memory/`` keys are dropped.

The records were made with the plain training passes (``update.share_prefix=False`` and
``update.old_logprobs='recompute'``, set below). With the defaults (shared prefixes; π_old from the
update's own forward when there is one mini-batch, as in ``default_rl``) the same first 3 steps must
give the plain run's metrics on the same machine within ``RTOL_SHARED_PREFIX`` (fp32 sums in another
order): the "must not change" check of issue 12, plus ``ATOL_NOISE`` absolute: values that are
themselves fp32 rounding (the first step's loss, a sum of advantages that cancel to ~5e-8;
``*/behaviour_logprob_gap``, ~3e-7; ``*/approx_kl``, exactly 0 with π_old from the update) differ by ~1e-7.

Each file keeps one recording per fingerprint (jax version, CPU vector extensions and the XLA code
generation, see tests/codegen.py: the suite compiles at LLVM level 0, training runs at XLA's default;
the two round differently, and the multi-turn setup's near-uniform tiny model samples other tokens
from last-bit logit changes). Comparison: bit-for-bit (every float as recorded) against the recording
with this session's fingerprint; with none, against the one with the same code generation (else the
first) with floats to 1e-4 relative and everything else exactly, since XLA may emit other kernels
elsewhere (AVX2 vs AVX-512).

Re-record this fingerprint's recording (only when a behaviour change is intended, and say so in the
commit; then re-record the other code generation too, ``REMA_JAX_TEST_CODEGEN=default``):
    python tests/test_golden_metrics.py
"""

import json
import pathlib
import sys

import codegen
import jax
import numpy as np
import pytest
from test_trainer_paths import NO_EVAL, TINY, alternating_rewards  # the same tiny shapes and rewards

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
BUILTIN = {
    "source": "builtin",
    "benchmark": None,
    "train_path": None,
    "test_path": None,
    "families": ["arithmetic", "word_problem"],
    "levels": [1],
    "train_per_cell": 4,
    "test_per_cell": 0,
}
STEPS = 3
PLAIN_PASSES = {"share_prefix": False, "old_logprobs": "recompute"}  # every row's every token, and a π_old pass
RTOL_OTHER_MACHINE = 1e-4
# Absolute floor of the comparison on another machine. Some metrics are zero up to fp32 noise: the
# first on-policy GRPO loss is -mean(A) over zero-mean groups (~1e-7), the behaviour gap is
# |sampler log-prob - training log-prob| (~3e-7); on another CPU kind that noise differs by its own
# size (loss -9.7e-8 recorded on an AVX-512 Xeon vs +4.5e-8 on an AMD EPYC; gap 5.0e-7 vs 3.4e-7).
# Metrics that are not noise are >= 5e-4 here, so the floor is <= 0.2% of them; RTOL_OTHER_MACHINE holds them.
ATOL_OTHER_MACHINE = 1e-6
NOISE_METRICS_ATOL = {"behaviour_logprob_gap": 1e-5}
RTOL_SHARED_PREFIX = 1e-4
ATOL_NOISE = 1e-6
_PLAIN_RUNS: dict[str, list[dict]] = {}  # this session's plain runs, reused by the shared-prefix check

pytestmark = pytest.mark.real_model  # the trainer reads SmolLM2's tokenizer


def _merge(cfg: dict, sections: dict) -> dict:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    for name, values in sections.items():
        cfg[name] = {**(cfg.get(name) or {}), **values}
    return cfg


def _shipped(name: str) -> dict:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib

    return importlib.import_module(f"configs.{name}").get_config().to_dict()


def setups() -> dict[str, dict]:
    """name → the shrunk config dict."""
    default_rl = _merge(
        _shipped("default")["rl"],
        {
            "model": {"random_init": TINY, "init_adapters_from": None, "max_cache_len": 272},
            "rollout": {"num_samples": 2, "max_new_tokens": 6, "max_prompt_len": 255},
            "adapter": {"rank": 4, "alpha": 8.0},
            "optimizer": {"learning_rate": 3e-2},
            "update": PLAIN_PASSES,
            "data": BUILTIN,
            "loop": {"steps": STEPS, "questions_per_step": 2, "max_seq_len": 262, **NO_EVAL},
            "checkpoint": {"every": STEPS, "keep_last": 1},
        },
    )
    multi_turn = _merge(
        _shipped("paper_multi_turn"),
        {
            "model": {
                "source": "smollm2-135m",
                "random_init": TINY,
                "dtype": "float32",
                "param_dtype": None,
                "max_cache_len": 272,
            },
            "rollout": {
                "num_samples": 2,
                "max_turns": 2,
                "max_new_tokens": 6,
                "max_prompt_len": 255,
                "stop_when_truncated": False,
            },
            "loss": {"max_turns": 2},
            "grading": {"workers": 1},
            "optimizer": {"learning_rate": 1e-3},
            "update": {"num_mini_batches": 2, "num_micro_batches": 1, **PLAIN_PASSES},
            "data": BUILTIN,
            "loop": {"steps": STEPS, "questions_per_step": 2, "max_seq_len": 262, **NO_EVAL},
            "checkpoint": {"every": STEPS, "keep_last": 1},
        },
    )
    return {"default_rl": default_rl, "paper_multi_turn": multi_turn}


def fingerprint() -> dict:
    """What decides the exact floats on CPU: jax/jaxlib versions, the vector extensions XLA targets and
    the code generation level (``codegen.name()``)."""
    import jaxlib

    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "isa": isa,
        "backend": jax.default_backend(),
        "codegen": codegen.name(),
    }


def recording(name: str) -> tuple[list[dict], bool]:
    """(records to compare with, whether bit-for-bit): the recording with this session's fingerprint,
    else the one with its code generation, else the first."""
    recordings = json.loads((GOLDEN / f"metrics_{name}.json").read_text())["recordings"]
    here = fingerprint()
    for r in recordings:
        if r["fingerprint"] == here:
            return r["records"], True
    same_codegen = [r for r in recordings if r["fingerprint"].get("codegen") == here["codegen"]]
    return (same_codegen or recordings)[0]["records"], False


def run_setup(name: str, workdir: str, defaults: bool = False) -> list[dict]:
    """Train ``name`` for STEPS steps and return its metrics records without time/throughput keys;
    ``defaults``: with the update's default passes instead of ``PLAIN_PASSES``."""
    from rema_jax.training import loop as loop_lib
    from rema_jax.training.config import load_train_config
    from rema_jax.training.metrics import read_jsonl

    cfg = setups()[name]
    if defaults:
        cfg["update"] = {k: v for k, v in cfg["update"].items() if k not in PLAIN_PASSES}
    cfg = load_train_config(cfg)
    loop_lib.train(cfg, workdir, progress=False, reward_override=alternating_rewards)
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))}
        for r in read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))
    ]


def _compare(got, want, exact: bool, where: str = "", rtol: float = RTOL_OTHER_MACHINE, atol: float | None = None):
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (where, sorted(set(got) ^ set(want)))
        for k in want:
            _compare(got[k], want[k], exact, f"{where}/{k}", rtol, atol)
    elif isinstance(want, float) and not exact:
        if atol is None:
            atol = NOISE_METRICS_ATOL.get(where.rsplit("/", 1)[-1], ATOL_OTHER_MACHINE)
        assert isinstance(got, (int, float)) and np.isclose(got, want, rtol=rtol, atol=atol), (
            where,
            got,
            want,
        )
    else:
        assert got == want, (where, got, want)


@pytest.mark.parametrize("name", ["default_rl", "paper_multi_turn"])
def test_first_steps_match_the_recorded_metrics(name, tmp_path):
    records, exact = recording(name)
    got = _PLAIN_RUNS[name] = run_setup(name, str(tmp_path / name))
    assert len(got) == STEPS
    for step, (g, w) in enumerate(zip(got, records), start=1):
        _compare(g, w, exact, f"{name} step {step}")


@pytest.mark.parametrize("name", ["default_rl", "paper_multi_turn"])
def test_default_passes_give_the_same_first_steps(name, tmp_path, monkeypatch):
    """The default passes (``update.share_prefix=True``, ``update.old_logprobs='auto'``) vs the plain
    ones on this machine: the same metrics within RTOL_SHARED_PREFIX, with the shared-prefix plan in
    use on every pass, and π_old taken from the update exactly when there is one mini-batch."""
    from rema_jax.training import learner as learner_lib

    plain = _PLAIN_RUNS.get(name) or run_setup(name, str(tmp_path / "plain"))
    planned = []
    real = learner_lib.Learner.with_prefix

    def counting(self, batch, chunks, role=""):
        out = real(self, batch, chunks, role)
        planned.append(out.prefix is not None)
        return out

    monkeypatch.setattr(learner_lib.Learner, "with_prefix", counting)
    old_passes = []
    real_old = learner_lib.Learner.old_logprobs
    monkeypatch.setattr(
        learner_lib.Learner, "old_logprobs", lambda self, *a: old_passes.append(1) or real_old(self, *a)
    )
    got = run_setup(name, str(tmp_path / name), defaults=True)
    assert planned and all(planned), planned
    one_mini_batch = setups()[name]["update"].get("num_mini_batches", 1) == 1
    assert (len(old_passes) == 0) == one_mini_batch, (name, len(old_passes))
    assert len(got) == STEPS
    for step, (g, w) in enumerate(zip(got, plain), start=1):
        _compare(g, w, False, f"{name} step {step} (default passes)", RTOL_SHARED_PREFIX, ATOL_NOISE)


if __name__ == "__main__":  # re-record, with the test session's settings (tests/conftest.py)
    import os
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["REMA_JAX_COMPILATION_CACHE"] = "off"
    codegen.apply()  # before the backend starts
    jax.config.update("jax_default_matmul_precision", "highest")

    GOLDEN.mkdir(exist_ok=True)
    here = fingerprint()
    for n in setups():
        with tempfile.TemporaryDirectory() as d:
            records = run_setup(n, d)
        path = GOLDEN / f"metrics_{n}.json"
        recordings = json.loads(path.read_text())["recordings"] if path.exists() else []
        kept = [r for r in recordings if r["fingerprint"] != here]
        new = {"fingerprint": here, "records": records}
        # in place when this fingerprint has a recording (the diff shows only what moved), else appended
        recordings = [new if r["fingerprint"] == here else r for r in recordings]
        recordings += [] if len(kept) < len(recordings) else [new]
        path.write_text(json.dumps({"recordings": recordings}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {n} ({here['codegen']}): {len(records)} steps, {len(records[0])} keys; kept {len(kept)} other")
