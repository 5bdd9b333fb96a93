"""Config validation, orbax checkpoints, metrics logging and plots."""

import dataclasses
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.config_utils import ConfigError, from_dict, to_dict
from rema_jax.training.checkpoint import CheckpointManager
from rema_jax.training.metrics import MetricsLogger, read_jsonl
from rema_jax.training.plots import plot_training_curves


@dataclasses.dataclass(frozen=True)
class _Inner:
    lr: float = 1e-6
    mode: Literal["a", "b"] = "a"
    targets: tuple[str, ...] = ("q_proj",)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class _Outer:
    steps: int
    inner: _Inner = _Inner()
    name: str | None = None


def test_from_dict_builds_nested_and_converts_types():
    cfg = from_dict(_Outer, {"steps": 3, "inner": {"lr": 1, "targets": ["q_proj", "v_proj"]}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.targets == ("q_proj", "v_proj")
    assert to_dict(cfg)["inner"]["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": 3, "inner": {"lrr": 1.0}}, "config.inner: unknown key(s) ['lrr']"),
        ({"steps": "3"}, "config.steps: expected an int"),
        ({"steps": 3, "inner": {"mode": "c"}}, "config.inner.mode: expected one of ['a', 'b']"),
        ({"steps": 3, "inner": {"lr": -1.0}}, "config.inner: lr must be > 0"),
        ({}, "config.steps: required field is missing"),
        ({"steps": True}, "config.steps: expected an int"),
    ],
)
def test_from_dict_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_Outer, data)
    assert message in str(e.value)


def test_from_dict_accepts_ml_collections():
    import ml_collections

    c = ml_collections.ConfigDict({"steps": 2, "inner": {"mode": "b"}})
    assert from_dict(_Outer, c).inner.mode == "b"


def _train_config(**sections):
    """A small valid TrainConfig dict (nothing is loaded: validation only)."""
    cfg = {
        "model": {"max_cache_len": 544},
        "rollout": {"mode": "single_turn", "num_samples": 4, "max_new_tokens": 8, "max_prompt_len": 287},
        "advantage": {"estimator": "grpo"},
        "loss": {"max_turns": 1},
        "loop": {"questions_per_step": 2, "solutions_per_plan": 2, "max_seq_len": 296},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def test_data_train_path_accepts_a_list_or_a_glob(tmp_path):
    from rema_jax.training.config import load_train_config

    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    bench = {"source": "benchmark", "benchmark": "math"}
    cfg = load_train_config(_train_config(data={**bench, "train_path": ["x/a.jsonl", "x/b.jsonl"]}))
    assert cfg.data.train_path == ("x/a.jsonl", "x/b.jsonl")  # plain paths: read at load time
    glob = str(tmp_path / "*.jsonl")
    assert load_train_config(_train_config(data={**bench, "train_path": glob})).data.train_path == glob
    missing = str(tmp_path / "math_train" / "*.jsonl")
    for path in (missing, [str(tmp_path / "a.jsonl"), missing]):
        with pytest.raises(ConfigError) as e:
            load_train_config(_train_config(data={**bench, "train_path": path}))
        assert "config.data: train_path: the glob" in str(e.value) and missing in str(e.value)
        assert "matched no files" in str(e.value)
    with pytest.raises(ConfigError, match="more than once"):
        load_train_config(_train_config(data={**bench, "train_path": [glob, str(tmp_path / "a.jsonl")]}))
    with pytest.raises(ConfigError, match="config.data.train_path: expected"):
        load_train_config(_train_config(data={**bench, "train_path": 3}))


def test_consistency_reward_needs_several_solutions_per_plan():
    from rema_jax.training.config import load_train_config

    load_train_config(_train_config(reward={"kind": "consistency"}))  # 2 solutions per plan
    with pytest.raises(ConfigError) as e:
        load_train_config(_train_config(reward={"kind": "consistency"}, loop={"solutions_per_plan": 1}))
    assert "loop.solutions_per_plan >= 2" in str(e.value) and "agree with itself" in str(e.value)


def test_old_logprob_pass_is_skipped_only_where_nothing_reads_pi_old_before_the_update():
    from rema_jax.training.config import load_train_config

    assert load_train_config(_train_config()).old_logprobs_in_update  # auto, one mini-batch, GRPO
    assert not load_train_config(_train_config(update={"num_mini_batches": 2})).old_logprobs_in_update
    assert not load_train_config(_train_config(update={"old_logprobs": "recompute"})).old_logprobs_in_update
    kl = {"estimator": "reinforce_pp", "kl_coef": 0.01}  # KL(π_old ‖ π_ref) in the reward
    assert not load_train_config(_train_config(advantage=kl)).old_logprobs_in_update
    with pytest.raises(ConfigError, match="update.old_logprobs='in_update'.*reads π_old before the update"):
        load_train_config(_train_config(advantage=kl, update={"old_logprobs": "in_update"}))
    with pytest.raises(ConfigError, match="config.update.*needs num_mini_batches == 1"):
        load_train_config(_train_config(update={"old_logprobs": "in_update", "num_mini_batches": 2}))


def test_dr_grpo_defaults_to_the_constant_normalised_token_sum():
    from rema_jax.training.config import load_train_config

    cfg = load_train_config(_train_config(advantage={"estimator": "dr_grpo"}))
    assert cfg.loss.agg_mode == "seq_mean_token_sum_norm"
    assert cfg.loss.token_sum_norm == 8.0  # rollout.max_new_tokens, one turn
    multi = load_train_config(
        _train_config(
            advantage={"estimator": "dr_grpo"},
            adapter={"kind": "shared"},
            schedule={"kind": "simultaneous"},
            rollout={"mode": "multi_turn", "max_turns": 3},
            reward={"kind": "multi_turn"},
            loss={"max_turns": 3},
            loop={"solutions_per_plan": 1},
        )
    )
    assert multi.loss.token_sum_norm == 24.0  # max_turns × max_new_tokens
    explicit = load_train_config(
        _train_config(advantage={"estimator": "dr_grpo"}, loss={"agg_mode": "trajectory_mean"})
    )
    assert explicit.loss.agg_mode == "trajectory_mean" and explicit.loss.token_sum_norm is None
    own = load_train_config(_train_config(advantage={"estimator": "dr_grpo"}, loss={"token_sum_norm": 100.0}))
    assert own.loss.agg_mode == "seq_mean_token_sum_norm" and own.loss.token_sum_norm == 100.0
    for est in ("grpo", "reinforce_pp"):  # unchanged for the other estimators
        assert load_train_config(_train_config(advantage={"estimator": est})).loss.agg_mode == "trajectory_mean"
    with pytest.raises(ConfigError, match="token_sum_norm"):
        load_train_config(_train_config(loss={"token_sum_norm": 100.0}))  # grpo: trajectory_mean


def test_suite_runs_fp32_matmuls_at_full_precision():
    """tests/conftest.py pins fp32 matmuls to full precision (TF32 on GPU / bf16 passes on TPU
    would break the 1e-5 comparisons); on CPU this is already what XLA does."""
    assert jax.config.jax_default_matmul_precision == "highest"
    x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(x) @ jnp.asarray(x)), x.astype(np.float64) @ x, rtol=1e-4, atol=1e-4
    )


def test_checkpoint_roundtrip_keep_last_and_none_leaves(tmp_path):
    mngr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    state = {
        "trainable": {"reasoning": {"w": jnp.arange(4.0)}, "meta_thinking": None},
        "rng": jax.random.key_data(jax.random.key(3)),
        "opt": (jnp.zeros((2,), jnp.int32), {"mu": jnp.ones((2, 2), jnp.bfloat16)}),
    }
    for step in (1, 2, 3):
        mngr.save(
            step,
            jax.tree.map(lambda x: x * step if x.dtype != jnp.uint32 else x, state),
            {"step": step, "data_position": 10 * step},
        )
    assert mngr.all_steps() == [2, 3]
    restored, meta = mngr.restore(None, state)
    assert meta == {"step": 3, "data_position": 30}
    assert restored["trainable"]["meta_thinking"] is None
    np.testing.assert_array_equal(restored["trainable"]["reasoning"]["w"], np.arange(4.0) * 3)
    assert restored["opt"][1]["mu"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["rng"], state["rng"])
    mngr.close()


def test_checkpoint_keep_steps_survive_keep_last(tmp_path):
    """``keep_steps`` (a phase boundary another run branches from) outlives ``keep_last``; a manager
    reopened on the directory keeps honouring it."""
    state = {"w": jnp.zeros(3)}
    mngr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2, keep_steps=(2,))
    for step in (1, 2, 3, 4):
        mngr.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
    assert mngr.all_steps() == [2, 3, 4]
    mngr.close()
    mngr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2, keep_steps=(2,))
    for step in (5, 6):
        mngr.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
    assert mngr.all_steps() == [2, 5, 6]
    restored, meta = mngr.restore(2, state)
    assert meta == {"step": 2}
    np.testing.assert_array_equal(restored["w"], np.full(3, 2.0))
    mngr.close()


def test_checkpoint_restore_missing_dir_is_clear(tmp_path):
    mngr = CheckpointManager(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        mngr.restore(None, {"a": jnp.zeros(1)})


def test_metrics_jsonl_tensorboard_and_resume_truncation(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in range(1, 5):
        log.write(step, {"reasoning/reward_mean": step * 0.1, "finish": "ok", "x": np.float32(np.nan)})
    log.close()
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3, 4]
    assert read_jsonl(log.path)[0]["x"] is None
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    # A run resumed from step 2 drops the records written after that checkpoint.
    MetricsLogger(str(tmp_path), tensorboard=False, resume_from_step=2).close()
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2]


def test_plot_training_curves_writes_png(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(20):
        log.write(step, {"reasoning/reward_mean": np.sin(step), "train/accuracy": step / 20})
    out = plot_training_curves(log.path, str(tmp_path / "curves.png"), title="t")
    assert out and os.path.getsize(out) > 1000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_section_kernel_fields_are_validated_and_reach_the_model_config():
    from rema_jax.training.base_model import build_base_model
    from rema_jax.training.config import load_train_config

    for field, bad in (("sampler_column_blocks", -1), ("logits_chunk", -2)):
        with pytest.raises(ConfigError, match=f"config.model.*{field} must be an int >= 0"):
            load_train_config(_train_config(model={field: bad}))
    with pytest.raises(ConfigError, match="config.model.*sampler_compact_min_batch must be None .auto. or an int >= 0"):
        load_train_config(_train_config(model={"sampler_compact_min_batch": -1}))
    with pytest.raises(ConfigError, match="config.model.*sampler_layout_reuse must be 0 .off. or a number >= 1"):
        load_train_config(_train_config(model={"sampler_layout_reuse": 0.9}))
    with pytest.raises(ConfigError, match="config.model.*sampler_weight_dtype='bf16'; expected one of"):
        load_train_config(_train_config(model={"sampler_weight_dtype": "bf16"}))
    cfg = load_train_config(
        _train_config(
            model={
                "sampler_column_blocks": 3,
                "logits_chunk": 8,
                "sampler_weight_dtype": "bfloat16",
                "sampler_compact_min_batch": 2,
                "remat_policy": "save_mlp",
                "sampler_layout_reuse": 2,
            }
        )
    )
    model_config, _, _ = build_base_model(cfg.model)
    assert model_config.sampler_layout_reuse == 2
    assert (model_config.sampler_column_blocks, model_config.logits_chunk) == (3, 8)
    assert model_config.sampler_compact_min_batch == 2 and model_config.remat_policy == "save_mlp"
    with pytest.raises(ConfigError, match="config.model.*remat_policy"):
        load_train_config(_train_config(model={"remat_policy": "mlp"}))
    assert model_config.sampler_weight_dtype == "bfloat16"


def test_sampler_share_prompts_is_validated_and_reaches_the_rollout_sampler(monkeypatch):
    from rema_jax.models.testing import tiny_config
    from rema_jax.training import rollout_worker
    from rema_jax.training.config import load_train_config
    from rema_jax.training.rollout_worker import RolloutWorker

    monkeypatch.setattr(rollout_worker, "ChatEncoder", lambda tokenizer: None)  # no tokenizer needed here
    with pytest.raises(ConfigError, match="config.model.sampler_share_prompts: expected a bool"):
        load_train_config(_train_config(model={"sampler_share_prompts": "no"}))
    for share in (True, False):
        cfg = load_train_config(_train_config(model={"sampler_share_prompts": share}, grading={"workers": 1}))
        worker = RolloutWorker(cfg, tiny_config(), tokenizer=None)
        assert worker.sampler.share_prefix is share
        worker.grader.close()
