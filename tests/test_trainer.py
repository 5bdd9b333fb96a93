"""The RL trainer end to end on a tiny random model with the real SmolLM2 tokenizer.

Covers: config validation before any compute, exact resume after a kill, the frozen agent staying
bit-identical, reward rising on a trivially learnable reward in each schedule, the NaN guard, and
the files a run leaves behind (metrics, TensorBoard, checkpoints, plots, summary).
"""

import contextlib
import copy
import os

import jax
import numpy as np
import pytest

from rema_jax.config_utils import ConfigError
from rema_jax.rl import tree_bitwise_equal
from rema_jax.training import layout as layout_lib
from rema_jax.training import loop as loop_lib
from rema_jax.training import trainer as trainer_lib
from rema_jax.training.config import TrainConfig, load_train_config
from rema_jax.training.metrics import read_jsonl

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}


def tiny_train_config(**sections) -> dict:
    cfg = {
        "model": {"source": "smollm2-135m", "random_init": TINY, "max_cache_len": 544},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "rollout": {
            "mode": "single_turn",
            "num_samples": 4,
            "max_new_tokens": 8,
            "max_prompt_len": 287,
            "stop_when_truncated": False,
        },
        "reward": {"kind": "paper"},
        "grading": {"timeout_s": 5.0},
        "advantage": {"estimator": "grpo"},
        "loss": {"max_turns": 1},
        "optimizer": {"learning_rate": 3e-2, "weight_decay": 0.0},
        "update": {"num_mini_batches": 1, "num_micro_batches": 1},
        "schedule": {"kind": "alternating", "reasoning_steps": 2, "meta_thinking_steps": 2},
        "data": {"source": "builtin", "levels": [1], "train_per_cell": 8, "test_per_cell": 2},
        "loop": {"steps": 4, "questions_per_step": 2, "max_seq_len": 296, "eval_questions": 0, "eval_before": False},
        "checkpoint": {"every": 1, "keep_last": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def first_token_reward(targets: dict):
    """Reward = 1 when a row's first generated token is its role's target token.

    The target is the most common first token of that role's first rollout: a bandit-like signal
    with a non-trivial base rate that a tiny random model can learn within a dozen steps.
    """
    import collections

    def override(exp):
        for role, rows in exp.rows.items():
            firsts = [tr.turns_of(role)[0].token_ids[:1] for tr in rows]
            if role not in targets:
                targets[role] = collections.Counter(firsts).most_common(1)[0][0]
            exp.rewards[role] = np.asarray([f == targets[role] for f in firsts], np.float32)
        return exp

    return override


@pytest.mark.parametrize(
    "override, message",
    [
        ({"loop": {"stepz": 3}}, "config.loop: unknown key(s) ['stepz']"),
        ({"loop": {"steps": "3"}}, "config.loop.steps: expected an int"),
        ({"rollout": {"mode": "three_agents"}}, "config.rollout"),
        ({"adapter": {"kind": "shared"}}, "needs schedule.kind='simultaneous'"),
        ({"reward": {"kind": "multi_turn"}}, "needs rollout.mode='multi_turn'"),
        ({"loop": {"max_seq_len": 100}}, "a training sequence may not fit"),
        ({"update": {"num_mini_batches": 3}}, "not divisible by num_mini_batches"),
        ({"loss": {"temperature": 0.7}}, "must equal the rollout temperature"),
        ({"memory": {"release_programs": "always"}}, "release_programs must be 'end' or 'phase'"),
        ({"loop": {"eval_batch_size": -1}}, "eval_batch_size must be >= 0"),
    ],
)
def test_config_errors_are_specific(override, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(tiny_train_config(**override))
    assert message in str(e.value)


def test_default_configs_validate():
    import importlib.util

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith(("eval", "sft", "experiment")):
            continue
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        raw = mod.get_config()
        if {"sft", "rl"} <= set(raw.keys()):  # a bootstrap config (tests/test_bootstrap.py)
            raw = raw.rl
        assert isinstance(load_train_config(raw), TrainConfig), name


def _strip_times(records):
    """Drops what legitimately differs between processes: timings and the sampler's compile count
    (cumulative per process, so a resumed run that never met steps 1-2's buckets counts fewer)."""
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "sampler/", "memory/"))}
        for r in records
    ]


@contextlib.contextmanager
def _persistent_cache_misses():
    """Yields a list that collects one entry per persistent-compilation-cache miss in the block."""
    misses, active = [], [True]

    def listener(name, **kw):
        if active[0] and name == "/jax/compilation_cache/cache_misses":
            misses.append(name)

    jax.monitoring.register_event_listener(listener)  # jax has no public unregister: switched off below
    try:
        yield misses
    finally:
        active[0] = False


@pytest.mark.real_model
def test_kill_and_resume_is_exact(tmp_path, smollm2_gguf):
    # 3 steps: RA, RA, MTA; "killed" after step 1, so the resumed run continues mid-phase and then
    # crosses into the next phase
    cfg = load_train_config(tiny_train_config(loop={"steps": 3}))
    straight = loop_lib.train(cfg, str(tmp_path / "straight"), progress=False)
    loop_lib.train(cfg, str(tmp_path / "resumed"), progress=False, max_steps=1)
    with _persistent_cache_misses() as misses:
        resumed = loop_lib.train(cfg, str(tmp_path / "resumed"), progress=False)
    assert resumed["resumed_from_step"] == 1 and straight["steps"] == resumed["steps"] == 3
    # the straight run compiled every program the resumed one runs: with a fresh state committed to its
    # device as a restored one is (learner._committed), all come from the persistent cache (conftest.py's)
    assert misses == [], f"{len(misses)} programs recompiled after resuming"

    a = trainer_lib.Trainer(cfg, str(tmp_path / "straight"))
    b = trainer_lib.Trainer(cfg, str(tmp_path / "resumed"))
    assert a.restore() and b.restore()
    # the sampler's prefill layouts travel with the checkpoint (they decide later calls' layouts)
    assert a.worker.sampler.layout_record() == b.worker.sampler.layout_record() != []
    assert tree_bitwise_equal(a.state.params, b.state.params)
    assert tree_bitwise_equal(a.state.opt_state, b.state.opt_state)
    ma = _strip_times(read_jsonl(str(tmp_path / "straight" / "metrics.jsonl")))
    mb = _strip_times(read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl")))
    assert [r["step"] for r in mb] == [1, 2, 3]
    assert [r["phase/trained"] for r in mb] == ["reasoning", "reasoning", "meta_thinking"]
    assert ma == mb
    for name in ("metrics.jsonl", "curves.png", "summary.json", "config.json"):
        assert (tmp_path / "straight" / name).exists(), name
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "straight" / "tb"))


@pytest.mark.real_model
@pytest.mark.parametrize(
    "schedule, adapter",
    [("alternating", "lora"), ("simultaneous", "shared"), pytest.param("switch_every", "lora", marks=pytest.mark.slow)],
)
def test_reward_rises_and_only_trained_agent_moves(tmp_path, smollm2_gguf, schedule, adapter):
    """The meta-thinking agent (whose prompt is the fixed question) learns a first-token bandit.

    alternating: step 0 trains the reasoning agent (Alg. 1 starts with it), then the meta-thinking
    agent trains while the reasoning agent stays bit-identical; switch_every (official variant):
    the meta-thinking agent from the first step; simultaneous: one shared model, both roles.
    """
    steps = 12
    cfg = load_train_config(
        tiny_train_config(
            model={"random_init": {**TINY, "init_std": 2.0}, "max_cache_len": 260},
            adapter={"kind": adapter},
            rollout={"num_samples": 8, "max_new_tokens": 2, "max_prompt_len": 160},
            schedule={
                "kind": schedule,
                "reasoning_steps": 1,
                "meta_thinking_steps": steps,
                "switch_freq": steps + 2,
                "start_agent": "meta_thinking",
            },
            optimizer={"learning_rate": 1e-2 if adapter == "lora" else 1e-3},
            data={"families": ["arithmetic"], "train_per_cell": 1, "test_per_cell": 0},
            loop={"steps": steps + 1, "questions_per_step": 1, "max_seq_len": 168},
            checkpoint={"every": steps},
        )
    )
    trainer = trainer_lib.Trainer(cfg, str(tmp_path), reward_override=first_token_reward({}))
    if schedule == "alternating":
        assert trainer.step()["phase/trained"] == "reasoning"
    frozen_before = jax.tree.map(np.asarray, trainer.state)
    rewards = []
    for _ in range(steps):
        m = trainer.step()
        assert "meta_thinking" in m["phase/trained"]
        rewards.append(m["meta_thinking/reward_mean"])
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last >= first + 0.25, (first, last, rewards)
    after = trainer.state
    if adapter == "lora":  # the reasoning agent was frozen: params and AdamW state untouched
        assert tree_bitwise_equal(frozen_before.params["reasoning"], after.params["reasoning"])
        assert tree_bitwise_equal(frozen_before.opt_state["reasoning"], after.opt_state["reasoning"])
        assert not tree_bitwise_equal(frozen_before.params["meta_thinking"], after.params["meta_thinking"])
    else:
        assert not tree_bitwise_equal(frozen_before.params["shared"], after.params["shared"])


@pytest.mark.real_model
def test_non_finite_update_stops_with_clear_error(tmp_path, smollm2_gguf):
    cfg = load_train_config(tiny_train_config(loop={"steps": 2}))

    def nan_reward(exp):
        for role in exp.rewards:
            exp.rewards[role] = np.full_like(exp.rewards[role], np.nan)
        return exp

    trainer = trainer_lib.Trainer(cfg, str(tmp_path), reward_override=nan_reward)
    before = copy.deepcopy(jax.tree.map(np.asarray, trainer.state.params))
    with pytest.raises(trainer_lib.NonFiniteUpdateError, match="NaN/inf"):
        trainer.step()
    assert tree_bitwise_equal(before, trainer.state.params)


@pytest.mark.real_model
def test_rl_starts_from_sft_adapters(tmp_path, smollm2_gguf):
    from rema_jax.models import Adapter, save_adapter

    cfg = load_train_config(tiny_train_config())
    fresh = trainer_lib.Trainer(cfg, str(tmp_path / "fresh"))
    for i, (agent, tree) in enumerate(fresh.state.params.items()):
        moved = jax.tree.map(lambda x: x + 0.01 * (i + 1), tree)
        save_adapter(str(tmp_path / "sft" / agent), Adapter(weights=moved, kind="lora", scale=cfg.adapter.scale))
    warm = trainer_lib.Trainer(
        load_train_config(tiny_train_config(model={"init_adapters_from": str(tmp_path / "sft")})),
        str(tmp_path / "warm"),
    )
    for i, agent in enumerate(fresh.state.params):
        expected = jax.tree.map(lambda x: np.asarray(x) + 0.01 * (i + 1), fresh.state.params[agent])
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), warm.state.params[agent], expected
        )
    with pytest.raises(ValueError, match="differ from the config's adapter"):
        trainer_lib.Trainer(
            load_train_config(
                tiny_train_config(
                    adapter={"rank": 8, "alpha": 16.0}, model={"init_adapters_from": str(tmp_path / "sft")}
                )
            ),
            str(tmp_path / "bad"),
        )


@pytest.mark.real_model
def test_vrp_sft_warm_starts_the_single_agent_rl_run(smollm2_gguf, tmp_path):
    """VRP SFT trains one ``single`` adapter that a VRP_RL trainer starts from."""
    from rema_jax.sft.train import load_sft_config, run_sft

    cfg = load_sft_config(
        {
            "model": {"source": "smollm2-135m", "random_init": TINY, "max_cache_len": 640},
            "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
            "data": {"builtin": True, "mode": "vrp", "levels": [1], "train_per_cell": 2, "test_per_cell": 1},
            "optimizer": {"learning_rate": 3e-2, "warmup_steps": 1},
            "loop": {"epochs": 4, "batch_size": 4, "max_seq_len": 256, "roles": ["single"]},
            "eval": {"questions": 1, "max_new_tokens": 8},
        }
    )
    run = run_sft(cfg, str(tmp_path / "sft"), progress=False)
    s = run.summary
    assert list(s["steps_per_agent"]) == ["single"]
    assert s["single/loss_last"] < s["single/loss_first"] - 0.5, s
    assert set(s["eval_after"]) >= {"accuracy", "boxed_rate"}
    rl_cfg = tiny_train_config(
        rollout={"mode": "vrp", "num_samples": 2}, model={"init_adapters_from": str(tmp_path / "sft" / "adapters")}
    )
    rl_cfg["schedule"] = {"kind": "alternating"}
    rl_cfg["loop"]["solutions_per_plan"] = 1
    rl_cfg["loop"]["seed"] = 3  # the random base is a function of model.random_init, not of the run's seed
    warm = trainer_lib.Trainer(load_train_config(rl_cfg), str(tmp_path / "rl"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
        warm.state.params["single"],
        run.params["single"],
    )
    # The adapters sit on the very base they were trained on (one model builder for SFT and RL).
    assert tree_bitwise_equal(warm.learner.constants[layout_lib.BASE], run.base)


@pytest.mark.real_model
def test_curriculum_keeps_questions_in_the_success_band_and_survives_resume(tmp_path, smollm2_gguf, monkeypatch):
    from rema_jax.training import experience as experience_lib
    from rema_jax.training.curriculum import curriculum_pool

    cfg = load_train_config(
        tiny_train_config(
            curriculum={"enabled": True, "low": 0.2, "high": 0.8, "num_samples": 5, "pool_size": 8}, loop={"steps": 2}
        )
    )
    trainer = trainer_lib.Trainer(cfg, str(tmp_path))
    real_collect = experience_lib.collect
    seen = {}

    def fake_collect(policy, encoder, tasks, rollout, reward, grade_fn, **kw):
        if rollout.num_samples != 5:  # a training rollout: the real thing
            return real_collect(policy, encoder, tasks, rollout, reward, grade_fn, **kw)
        seen["overrides"] = kw.get("sampling_overrides")
        # Question i is solved in (i % 6) of its 5 samples: rates 0, .2, .4, .6, .8, 1.0, 0, .2
        correct = [s < (i % 6) for i in range(len(tasks)) for s in range(5)]
        seen["rates"] = {t.uid: (i % 6) / 5 for i, t in enumerate(tasks)}
        return experience_lib.Experience(
            trajectories=[], correct=correct, rows={}, rewards={}, group_ids={}, grade_stats={}
        )

    monkeypatch.setattr(experience_lib, "collect", fake_collect)
    pool = curriculum_pool(
        trainer.worker, trainer.sampling_view(), trainer.train_tasks, trainer.roles, trainer.phase(0), cfg
    )
    assert {t.uid for t in pool} == {u for u, r in seen["rates"].items() if 0.2 <= r <= 0.8}
    # Phase agent (reasoning) samples at T=1; the frozen meta-thinking agent is greedy (Alg. 1).
    assert seen["overrides"] == {"meta_thinking": {"greedy": True}, "reasoning": {"greedy": False, "temperature": 1.0}}
    trainer.step()
    trainer.save()
    resumed = trainer_lib.Trainer(cfg, str(tmp_path))
    assert resumed.restore()
    assert [t.uid for t in resumed.pool] == [t.uid for t in trainer.pool]
    assert resumed.iterator.position == trainer.iterator.position


def test_evaluation_sends_eval_batch_size_questions_per_sampler_call(monkeypatch):
    """``loop.eval_batch_size`` caps the rows of one sampler call (its KV cache and prefill); 0 = all."""
    import types

    from rema_jax.eval import harness, solvers
    from rema_jax.training.rollout_worker import RolloutWorker

    seen = []
    monkeypatch.setattr(harness, "evaluate_benchmark", lambda tasks, solver, **kw: seen.append(kw["settings"]))
    monkeypatch.setattr(solvers, "rollout_solver", lambda *args: None)
    for loop in ({"eval_batch_size": 16}, {}):
        worker = RolloutWorker.__new__(RolloutWorker)  # no sampler or tokenizer: nothing is generated
        worker.config = load_train_config(tiny_train_config(loop=loop))
        worker.encoder, worker.policy = None, lambda view, seed: None
        worker.sampler = types.SimpleNamespace(release_fused=lambda: None)
        worker.evaluate((None, {}), [None] * 48, 0, None)
    assert [s.batch_size for s in seen] == [16, 48]


@pytest.mark.real_model
def test_phase_release_drops_programs_at_phase_starts_and_after_evaluations(tmp_path, smollm2_gguf, monkeypatch):
    """``memory.release_programs='phase'``: the learner's programs go at each phase start (the metrics
    are unchanged: tests/test_golden_metrics.py runs configs/default.py, which sets it, across a phase
    start), an evaluation's sampler programs go when it ends."""
    released = []
    release = trainer_lib.Trainer.release_programs

    def counted(self, **kw):
        release(self, **kw)
        released.append((self.step_index, self.learner.update_fn.jitted._cache_size()))

    monkeypatch.setattr(trainer_lib.Trainer, "release_programs", counted)
    cfg = load_train_config(
        tiny_train_config(
            memory={"release_programs": "phase"},
            loop={"eval_questions": 2, "steps": 2},
            schedule={"reasoning_steps": 1, "meta_thinking_steps": 1},
        )
    )
    trainer = trainer_lib.Trainer(cfg, str(tmp_path))
    sampler = trainer.worker.sampler
    trainer.evaluate(trainer_lib.heldout_subset(trainer.test_tasks, 2), "step_0")
    assert sampler.compile_count > 0 and sampler.program_keys() == frozenset()  # greedy eval programs gone
    trainer.step()
    assert released == [] and trainer.learner.update_fn.jitted._cache_size() == 1
    trainer.step()
    assert released == [(1, 0)]  # the meta-thinking phase started at step 1 with no update compiled
    trainer.checkpoints.close()
