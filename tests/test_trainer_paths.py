"""Trainer paths the other trainer tests do not run, on tiny random models with SmolLM2's tokenizer.

- the NaN guard through ``train()``: the error, the in-memory state, the last checkpoint intact bit
  for bit, the metrics file, and a re-run that resumes from that checkpoint;
- ``train()`` with ``eval_before`` and ``eval_every``: the held-out JSONL files and the summary;
- one ``Trainer.step`` of each shipped RL setup not stepped elsewhere: the VRP_RL baseline
  (configs/vrp_rl_default.py), the official multi-turn setup (configs/paper_multi_turn.py: shared
  weights, simultaneous, multi-turn) and the paper's single-turn setup (configs/paper_single_turn.py:
  REINFORCE++ with a KL reward, full adapters, curriculum), each shrunk to a tiny model on built-in
  tasks;
- the rollout ↔ trainer log-prob gap (``<role>/behaviour_logprob_gap``): at temperature 1 in fp32
  the sampler's behaviour log-probs and the trainer's recomputed old log-probs agree to ~1e-6,
  checked after an update has moved the sampled policy away from its initialisation.
"""

import copy
import dataclasses
import hashlib
import importlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from rema_jax import rl
from rema_jax.rl import agent_step_count, tree_bitwise_equal
from rema_jax.training import loop as loop_lib
from rema_jax.training import trainer as trainer_lib
from rema_jax.training.checkpoint import CheckpointManager
from rema_jax.training.config import load_train_config
from rema_jax.training.metrics import read_jsonl

pytestmark = pytest.mark.real_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
GAP_TOL = 1e-5  # mean |behaviour - recomputed| log-prob per sampled token, T = 1, fp32
_TOKENIZERS = {}


@pytest.fixture(autouse=True)
def _cached_tokenizer(monkeypatch, smollm2_gguf):
    """Every Trainer here reads the same GGUF tokenizer (~10 s each on 2 busy cores): read it once."""
    from rema_jax.models import tokenizer as tokenizer_lib

    real = tokenizer_lib.load_tokenizer

    def cached(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = real(*args, **kwargs)
        return _TOKENIZERS[key]

    monkeypatch.setattr(tokenizer_lib, "load_tokenizer", cached)


def _merge(cfg: dict, sections: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for name, values in sections.items():
        cfg[name] = {**(cfg.get(name) or {}), **values}
    return cfg


def tiny_config(**sections) -> dict:
    cfg = {
        "model": {"source": "smollm2-135m", "random_init": TINY, "max_cache_len": 272},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "rollout": {
            "mode": "single_turn",
            "num_samples": 2,
            "max_new_tokens": 6,
            "max_prompt_len": 191,
            "stop_when_truncated": False,
        },
        "reward": {"kind": "paper"},
        "grading": {"timeout_s": 5.0},
        "advantage": {"estimator": "grpo"},
        "loss": {"max_turns": 1},
        "optimizer": {"learning_rate": 3e-2, "weight_decay": 0.0},
        "update": {"num_mini_batches": 1, "num_micro_batches": 1},
        "schedule": {"kind": "alternating", "reasoning_steps": 2, "meta_thinking_steps": 2},
        "data": {"source": "builtin", "levels": [1], "train_per_cell": 4, "test_per_cell": 2},
        "loop": {"steps": 3, "questions_per_step": 2, "max_seq_len": 198, "eval_questions": 0, "eval_before": False},
        "checkpoint": {"every": 1, "keep_last": 3},
    }
    return _merge(cfg, sections)


def shipped_config(name: str, **sections) -> dict:
    """configs/<name>.py as a plain dict, with ``sections`` merged over it."""
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"configs.{name}")
    return _merge(module.get_config().to_dict(), sections)


def alternating_rewards(exp):
    """Rewards 1, 0, 1, 0, ... in every group of 2 rows: non-zero advantages, so every step moves
    the trained agent (a random model's real rewards are all equal)."""
    for role in exp.rewards:
        exp.rewards[role] = (np.arange(len(exp.rewards[role])) % 2 == 0).astype(np.float32)
    return exp


def nan_rewards(exp):
    for role in exp.rewards:
        exp.rewards[role] = np.full_like(exp.rewards[role], np.nan)
    return exp


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _files_digest(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _assert_gap_small(metrics, roles):
    for role in roles:
        gap = metrics[f"{role}/behaviour_logprob_gap"]
        assert 0.0 <= gap < GAP_TOL, (role, gap)


# ----------------------------------------------------------------------------- NaN guard via train()


@pytest.mark.slow  # 60 s; the default run keeps test_trainer's non-finite-update and kill-and-resume tests
def test_nan_step_in_train_keeps_last_checkpoint_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Steps 1-2 train normally; step 3's rewards are NaN. train() raises NonFiniteUpdateError,
    the trainer's state and step index are the step-2 ones, checkpoint 2 is byte-identical to what
    was on disk when step 3 began, no step-3 checkpoint or metrics line exists, and a plain re-run
    resumes from step 2."""
    cfg = load_train_config(tiny_config())
    wd = tmp_path / "run"
    ckpts = wd / "checkpoints"
    before_step_3 = {}

    def nan_on_third_step(exp):
        step = len(before_step_3.setdefault("calls", [])) + 1
        before_step_3["calls"].append(step)
        if step < 3:
            return alternating_rewards(exp)
        before_step_3["digest"] = _files_digest(ckpts)  # checkpoints 1 and 2 are on disk by now
        before_step_3["metrics"] = read_jsonl(str(wd / "metrics.jsonl"))
        return nan_rewards(exp)

    made = []

    class Recording(trainer_lib.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loop_lib, "Trainer", Recording)
    with pytest.raises(trainer_lib.NonFiniteUpdateError, match=r"checkpoint \(step 2\)"):
        loop_lib.train(cfg, str(wd), progress=False, reward_override=nan_on_third_step)
    assert before_step_3["calls"] == [1, 2, 3]
    records = before_step_3["metrics"]
    assert [r["step"] for r in records] == [1, 2]
    # step 2 sampled with the LoRA adapter step 1 trained: the sampler and the trainer still agree
    _assert_gap_small(records[1], ["reasoning"])
    assert any(k.startswith("2/") for k in before_step_3["digest"])

    (failed,) = made
    assert failed.step_index == 2
    restored, meta = CheckpointManager(str(ckpts)).restore(2, failed.learner.checkpoint_tree())
    assert meta["step"] == 2
    assert tree_bitwise_equal(_host(failed.state.params), _host(restored["params"]))
    assert tree_bitwise_equal(_host(failed.state.opt_state), _host(restored["opt_state"]))
    assert int(agent_step_count(failed.state.opt_state["reasoning"])) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(failed.state.params)))
    assert _files_digest(ckpts) == before_step_3["digest"]  # nothing written, nothing rewritten
    assert read_jsonl(str(wd / "metrics.jsonl")) == records

    made.clear()
    resumed = loop_lib.train(cfg, str(wd), progress=False, reward_override=alternating_rewards)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3
    after = read_jsonl(str(wd / "metrics.jsonl"))
    assert [r["step"] for r in after] == [1, 2, 3] and after[:2] == records
    assert after[2]["phase/trained"] == "meta_thinking"
    assert CheckpointManager(str(ckpts)).latest_step() == 3
    (rerun,) = made
    # the re-run started from checkpoint 2: the frozen reasoning agent is exactly its step-2 value
    assert tree_bitwise_equal(_host(rerun.state.params["reasoning"]), _host(restored["params"]["reasoning"]))
    assert int(agent_step_count(rerun.state.opt_state["reasoning"])) == 2
    assert int(agent_step_count(rerun.state.opt_state["meta_thinking"])) == 1


# ----------------------------------------------------------------------------- held-out evaluation


def test_train_writes_heldout_evals_before_every_and_after(tmp_path, monkeypatch):
    """eval_before + eval_every=1 over 2 steps: eval/step_0, step_1, step_2 .jsonl with one greedy
    sample per held-out question, and each accuracy logged / summarised from its own file. The
    math grader is replaced by one that marks a different share correct in each evaluation, so a
    value read from the wrong evaluation (or a constant) cannot pass."""
    from rema_jax.rewards import math_grading
    from rema_jax.rewards.math_grading import GradeResult

    verdicts = iter([[True, False], [True, True], [False, False]])  # steps 0, 1, 2
    calls = []

    def fake_grade_batch(preds, golds, timeout=10.0, **kw):
        calls.append((list(preds), list(golds)))
        return [GradeResult(correct=c) for c in next(verdicts)]

    monkeypatch.setattr(math_grading, "grade_batch", fake_grade_batch)
    cfg = load_train_config(
        tiny_config(
            loop={"steps": 2, "eval_every": 1, "eval_questions": 2, "eval_before": True}, checkpoint={"every": 2}
        )
    )
    wd = tmp_path / "run"
    summary = loop_lib.train(cfg, str(wd), progress=False)
    assert len(calls) == 3

    test_tasks = trainer_lib.load_tasks(cfg)[1]
    expected_uids = [t.uid for t in trainer_lib.heldout_subset(test_tasks, 2)]
    assert len({t.subject for t in trainer_lib.heldout_subset(test_tasks, 2)}) == 2  # round-robin
    assert sorted(os.listdir(wd / "eval")) == ["step_0.jsonl", "step_1.jsonl", "step_2.jsonl"]
    accuracy = {}
    for step, verdict in zip((0, 1, 2), ([True, False], [True, True], [False, False])):
        recs = read_jsonl(str(wd / "eval" / f"step_{step}.jsonl"))
        assert [r["uid"] for r in recs] == expected_uids
        assert [r["sample"] for r in recs] == [0, 0]
        assert [r["correct"] for r in recs] == verdict
        assert all(r["mode"] == "single_turn" and r["messages"] for r in recs)
        assert [r["final_answer"] for r in recs] == calls[step][0]
        accuracy[step] = float(np.mean(verdict))

    metrics = {r["step"]: r for r in read_jsonl(str(wd / "metrics.jsonl"))}
    assert sorted(metrics) == [0, 1, 2]
    for step in (0, 1, 2):
        assert metrics[step]["eval/accuracy"] == pytest.approx(accuracy[step])
        assert "eval/boxed_rate" in metrics[step]
    on_disk = json.loads((wd / "summary.json").read_text())
    for s in (summary, on_disk):
        assert s["eval_before"] == pytest.approx(accuracy[0])
        assert s["eval_after"] == pytest.approx(accuracy[2])
        assert s["steps"] == 2


# ----------------------------------------------------------------------------- shipped setups, shrunk

BUILTIN = {
    "source": "builtin",
    "benchmark": None,
    "train_path": None,
    "test_path": None,
    "families": ["arithmetic", "word_problem"],
    "levels": [1],
    "train_per_cell": 2,
    "test_per_cell": 0,
}
NO_EVAL = {"eval_questions": 0, "eval_before": False, "eval_every": 0}


class Capture:
    """A reward override that records each step's experience and real rewards, then puts
    alternating rewards in their place (a random model's real rewards have no variance)."""

    def __init__(self):
        self.experiences, self.real_rewards = [], []

    def __call__(self, exp):
        self.experiences.append(exp)
        self.real_rewards.append({r: v.copy() for r, v in exp.rewards.items()})
        return alternating_rewards(exp)


def _finite_update(metrics, agent):
    assert np.isfinite(metrics[f"{agent}/grad_norm"]) and metrics[f"{agent}/grad_norm"] > 0
    assert np.isfinite(metrics[f"{agent}/loss"])


def test_vrp_rl_baseline_config_steps(tmp_path):
    """configs/vrp_rl_default.py (one ``single`` agent, VRP prompt, GRPO), 2 steps."""
    cfg = load_train_config(
        shipped_config(
            "vrp_rl_default",
            model={"random_init": TINY, "max_cache_len": 160},
            rollout={"num_samples": 2, "max_new_tokens": 6, "max_prompt_len": 127},
            optimizer={"learning_rate": 3e-2},
            data=BUILTIN,
            loop={"steps": 2, "questions_per_step": 2, "max_seq_len": 134, **NO_EVAL},
        )
    )
    assert cfg.rollout.mode == "vrp" and cfg.update.num_micro_batches == 2  # the shipped values kept
    capture = Capture()
    tr = trainer_lib.Trainer(cfg, str(tmp_path), reward_override=capture)
    assert tr.roles == ("single",) and set(tr.state.params) == {"single"}
    init = _host(tr.state.params)
    m1 = tr.step()
    assert m1["phase/trained"] == "single"
    _finite_update(m1, "single")
    assert m1["single/loss_tokens"] > 0 and "single/pg_loss" in m1
    (exp,) = capture.experiences
    assert len(exp.trajectories) == 4 and all([t.role for t in tr_.turns] == ["single"] for tr_ in exp.trajectories)
    assert set(capture.real_rewards[0]) == {"single"}
    assert set(capture.real_rewards[0]["single"].tolist()) <= {1.0, -0.5, -1.0}
    assert not tree_bitwise_equal(init["single"], _host(tr.state.params["single"]))
    assert int(agent_step_count(tr.state.opt_state["single"])) == 1
    m2 = tr.step()
    assert int(agent_step_count(tr.state.opt_state["single"])) == 2
    _assert_gap_small(m1, ["single"])
    _assert_gap_small(m2, ["single"])  # sampled with the adapter step 1 trained


def test_paper_multi_turn_config_steps(tmp_path):
    """configs/paper_multi_turn.py: one shared model plays both roles, trained simultaneously on
    multi-turn conversations (GRPO per role, turn-level geometric ratio, 2 mini-batches). Shrunk:
    a tiny fp32 model, 2 rounds of 6 tokens; ``stop_when_truncated`` off so that a 6-token turn
    does not end every conversation after one message and both rounds are trained."""
    cfg = load_train_config(
        shipped_config(
            "paper_multi_turn",
            model={
                "source": "smollm2-135m",
                "random_init": TINY,
                "dtype": "float32",
                "param_dtype": None,
                "max_cache_len": 272,
            },
            rollout={
                "num_samples": 2,
                "max_turns": 2,
                "max_new_tokens": 6,
                "max_prompt_len": 255,
                "stop_when_truncated": False,
            },
            loss={"max_turns": 2},
            grading={"workers": 1},
            optimizer={"learning_rate": 1e-3},
            update={"num_mini_batches": 2, "num_micro_batches": 1},
            data=BUILTIN,
            loop={"steps": 2, "questions_per_step": 2, "max_seq_len": 262, **NO_EVAL},
        )
    )
    assert (cfg.adapter.kind, cfg.schedule.kind, cfg.rollout.mode, cfg.reward.kind) == (
        "shared",
        "simultaneous",
        "multi_turn",
        "multi_turn",
    )
    capture = Capture()
    tr = trainer_lib.Trainer(cfg, str(tmp_path), reward_override=capture)
    assert tr.layout.shared and set(tr.state.params) == {"shared"}
    init = _host(tr.state.params["shared"])
    m1 = tr.step()
    assert m1["phase/trained"] == "meta_thinking+reasoning"
    _finite_update(m1, "shared")
    (exp,) = capture.experiences
    for t in exp.trajectories:  # two full rounds (no [FINISH] from a random model)
        assert t.finish_reason == "out_of_turns"
        assert [x.role for x in t.turns] == ["meta_thinking", "reasoning"] * 2
    for role in ("meta_thinking", "reasoning"):
        np.testing.assert_array_equal(capture.real_rewards[0][role], 0.0)  # not finished: 0
        assert f"{role}/pg_loss" in m1
        # both turns of every row are under the loss: more than one turn's worth of tokens
        assert m1[f"{role}/loss_tokens"] > 4 * (cfg.rollout.max_new_tokens + 1)
    assert not tree_bitwise_equal(init, _host(tr.state.params["shared"]))
    assert int(agent_step_count(tr.state.opt_state["shared"])) == 2  # 2 mini-batches
    m2 = tr.step()
    _assert_gap_small(m1, ["meta_thinking", "reasoning"])
    _assert_gap_small(m2, ["meta_thinking", "reasoning"])  # sampled with the updated shared model


def test_paper_single_turn_config_steps(tmp_path):
    """configs/paper_single_turn.py: two full models, alternating phases with the curriculum
    filter at each phase start, REINFORCE++ with the k1 KL to the initial model in the reward.
    Three steps (RA, MTA, RA): the frozen agent stays bit-identical, and the reference log-probs
    equal the policy's at the start and differ once the agent has moved."""
    cfg = load_train_config(
        shipped_config(
            "paper_single_turn",
            model={
                "source": "smollm2-135m",
                "random_init": TINY,
                "dtype": "float32",
                "param_dtype": None,
                "max_cache_len": 272,
            },
            rollout={"num_samples": 2, "max_new_tokens": 6, "max_prompt_len": 191},
            grading={"workers": 1},
            optimizer={"learning_rate": 1e-3},
            update={"num_mini_batches": 2, "num_micro_batches": 1},
            schedule={"reasoning_steps": 1, "meta_thinking_steps": 1},
            curriculum={"num_samples": 2, "pool_size": 4},
            data=BUILTIN,
            loop={"steps": 3, "questions_per_step": 2, "max_seq_len": 198, **NO_EVAL},
        )
    )
    assert (cfg.adapter.kind, cfg.advantage.estimator, cfg.curriculum.enabled) == ("full", "reinforce_pp", True)
    assert cfg.advantage.kl_coef > 0
    capture = Capture()
    tr = trainer_lib.Trainer(cfg, str(tmp_path), reward_override=capture)
    lp = {"old": [], "ref": []}

    def recording(fn, key):
        def wrapped(params, role, batch):
            out = fn(params, role, batch)
            lp[key].append((role, np.asarray(out), np.asarray(batch.loss_mask)))
            return out

        return wrapped

    tr.learner.logprob_fn = recording(tr.learner.logprob_fn, "old")
    tr.learner.ref_logprob_fn = recording(tr.learner.ref_logprob_fn, "ref")
    updates = []
    real_role_batches = tr._role_batches

    def recording_role_batches(*args, **kwargs):
        out = real_role_batches(*args, **kwargs)
        updates.append(
            {
                r: {
                    **b.sequences.as_dict(),
                    **{k: getattr(b.train, k) for k in ("advantages", "old_logprobs", "ref_logprobs")},
                }
                for r, b in out.items()
            }
        )
        return out

    tr._role_batches = recording_role_batches
    init = _host(tr.state.params)
    base_leaves = jax.tree.leaves(_host(tr.learner.constants["base"]))
    assert all(tree_bitwise_equal(jax.tree.leaves(init[r]), base_leaves) for r in tr.roles)  # full copies

    m0 = tr.step()
    assert m0["phase/trained"] == "reasoning" and tr._pool_phase == 0
    _finite_update(m0, "reasoning")
    after0 = _host(tr.state.params)
    assert not tree_bitwise_equal(init["reasoning"], after0["reasoning"])
    assert tree_bitwise_equal(init["meta_thinking"], after0["meta_thinking"])
    assert int(agent_step_count(tr.state.opt_state["reasoning"])) == 2
    assert int(agent_step_count(tr.state.opt_state["meta_thinking"])) == 0

    m1 = tr.step()
    assert m1["phase/trained"] == "meta_thinking" and tr._pool_phase == 1
    after1 = _host(tr.state.params)
    assert tree_bitwise_equal(after0["reasoning"], after1["reasoning"])
    assert not tree_bitwise_equal(after0["meta_thinking"], after1["meta_thinking"])
    assert {t.uid for t in tr.pool} <= {t.uid for t in tr.train_tasks}

    m2 = tr.step()
    assert m2["phase/trained"] == "reasoning" and tr._pool_phase == 2
    assert [r for r, _, _ in lp["ref"]] == [r for r, _, _ in lp["old"]] == ["reasoning", "meta_thinking", "reasoning"]
    for i, (moved) in enumerate((False, False, True)):
        (_, old, mask), (_, ref, _) = lp["old"][i], lp["ref"][i]
        diff = np.abs(old - ref)[mask > 0]
        if moved:  # step 2: the reasoning agent has moved away from the initial (reference) model
            assert diff.mean() > 1e-4, diff.mean()
        else:  # the trained agent still is the initial model
            assert diff.max() < 1e-5, diff.max()
    for m, role in ((m0, "reasoning"), (m1, "meta_thinking"), (m2, "reasoning")):
        _assert_gap_small(m, [role])
    # The update got REINFORCE++ advantages with the KL to the reference folded into the reward.
    (b,) = updates[2].values()
    inputs = dict(
        rewards_b=b["rewards"],
        group_ids_b=b["group_ids"],
        loss_mask_bt=b["loss_mask"],
        turn_ids_bt=b["turn_ids"],
        old_logprobs_bt=b["old_logprobs"],
    )
    with_kl = np.asarray(rl.compute_advantages(cfg.advantage, **inputs, ref_logprobs_bt=b["ref_logprobs"]))
    without = np.asarray(rl.compute_advantages(dataclasses.replace(cfg.advantage, kl_coef=0.0), **inputs))
    np.testing.assert_allclose(b["advantages"], with_kl, rtol=1e-6, atol=1e-7)
    assert np.abs(b["advantages"] - without).max() > 1e-3  # the KL term is in them (~5e-3 here)
