"""The RL trainer under a device mesh == the trainer on one device (8 simulated CPU devices).

The device count is fixed when JAX initialises, so each run is a subprocess executing this file as
a script (`_worker`): one with a single CPU device (the unchanged single-device path) and one with
`--xla_force_host_platform_device_count=8` that trains on the mesh (data, fsdp, tensor) = (2, 4, 1)
(add meshes to `MESHES`; each costs about a minute on 2 CPU cores). Each does 2 `Trainer.step()`s (reasoning phase, then meta-thinking phase) of the tiny
random-weight model of `tests/test_trainer.py` and writes its parameters, optimizer state, metrics
and per-device shard shapes; the tests compare them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import codegen  # tests/codegen.py: the session's XLA code generation
import numpy as np
import pytest

MESHES = [(2, 4, 1)]
STEPS = 2
TOL = 1e-6
# metrics that must be identical: rollouts and rewards do not depend on the layout
EXACT_METRICS = (
    "reasoning/reward_mean",
    "meta_thinking/reward_mean",
    "train/accuracy",
    "reasoning/loss_tokens",
    "meta_thinking/loss_tokens",
    "phase/trained",
)


def _config(mesh):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import tiny_train_config

    from rema_jax.training.config import load_train_config

    return load_train_config(
        tiny_train_config(
            schedule={"kind": "alternating", "reasoning_steps": 1, "meta_thinking_steps": 1},
            # eps 1e-2: AdamW's first step is lr*g/(|g|+eps), so with eps 1e-8 a gradient entry of ~1e-7 turns
            # fp32 summation-order noise (~1e-8: a sharded reduction adds in another order) into percent-level
            # differences of that entry's step; eps bounds d(param)/d(g) by lr/eps = 3 (cf. test_sharding_mesh8.py).
            optimizer={"eps": 1e-2},
            mesh=dict(zip(("data", "fsdp", "tensor"), mesh)) if mesh else {},
        )
    )


def even_token_reward(exp):
    """Reward = share of even token ids in a row's own generated tokens: a function of the sampled
    tokens only, so that GRPO advantages are non-zero on a random model (all-wrong answers give none)."""
    for role, rows in exp.rows.items():
        vals = []
        for tr in rows:
            ids = [i for t in tr.turns_of(role, include_dummy=False) for i in t.token_ids]
            vals.append(np.mean([i % 2 == 0 for i in ids]) if ids else 0.0)
        exp.rewards[role] = np.asarray(vals, np.float32)
    return exp


def _worker(out_dir: str, meshes: list) -> None:
    import jax

    from rema_jax.training import trainer as trainer_lib

    for mesh in meshes:
        name = "x".join(map(str, mesh)) if mesh else "single"
        cfg = _config(mesh)
        t0 = time.perf_counter()
        trainer = trainer_lib.Trainer(cfg, os.path.join(out_dir, name), reward_override=even_token_reward)
        metrics = [trainer.step() for _ in range(STEPS)]
        flat, _ = jax.tree_util.tree_flatten_with_path(
            {"params": trainer.state.params, "opt_state": trainer.state.opt_state}
        )
        arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
        rec = {
            "mesh": name,
            "devices": jax.device_count(),
            "metrics": [
                {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/", "memory/"))} for m in metrics
            ],
            "memory_peak": trainer.memory_plan.peak_bytes,
            "seconds": time.perf_counter() - t0,
        }
        if mesh:
            base_q = trainer.learner.constants["base"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
            lora = trainer.state.params["reasoning"]["layers_0"]["self_attn"]["q_proj"]
            mu = trainer.state.opt_state["reasoning"][0].mu["layers_0"]["self_attn"]["q_proj"]
            rec["shards"] = {
                "base_q": list(base_q.addressable_shards[0].data.shape),
                "base_embed": list(
                    trainer.learner.constants["base"]["embed_tokens"]["embedding"].addressable_shards[0].data.shape
                ),
                "lora_a": list(lora["lora_a"].addressable_shards[0].data.shape),
                "lora_a_mu": list(mu["lora_a"].addressable_shards[0].data.shape),
                "n_base_q_shards": len(base_q.addressable_shards),
            }
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(rec, f)


def _spawn(out_dir, devices: int, meshes: list) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(codegen.flags())  # the session's code generation only
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(out_dir), json.dumps(meshes)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("trainer_mesh")
    procs = [_spawn(out, 1, [None]), _spawn(out, 8, MESHES)]
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode:
            pytest.fail(f"trainer worker failed (rc {p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
        outputs.append(stdout)
    names = ["single"] + ["x".join(map(str, m)) for m in MESHES]
    recs = {}
    for n in names:
        with open(out / f"{n}.json") as f:
            recs[n] = json.load(f)
        recs[n]["arrays"] = dict(np.load(out / f"{n}.npz"))
    recs["single"]["stdout"] = outputs[0]
    return recs


@pytest.mark.real_model
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_training_matches_single_device(runs, mesh):
    ref, got = runs["single"], runs["x".join(map(str, mesh))]
    assert ref["devices"] == 1 and got["devices"] == 8
    assert sorted(ref["arrays"]) == sorted(got["arrays"])
    moved = 0.0
    for key, a in ref["arrays"].items():
        b = got["arrays"][key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        assert diff < TOL, f"{key}: max |single - mesh {mesh}| = {diff}"
    for agent in ("reasoning", "meta_thinking"):  # both agents trained once (reasoning, then MTA phase)
        lora_b = [k for k in ref["arrays"] if k.startswith(f"['params']['{agent}']") and "lora_b" in k]
        moved = max(float(np.abs(ref["arrays"][k]).max()) for k in lora_b)
        assert moved > 1e-3, f"{agent}: LoRA B did not move from zero ({moved}); the comparison is vacuous"
    for step, (m_ref, m_got) in enumerate(zip(ref["metrics"], got["metrics"])):
        for k in EXACT_METRICS:
            if k in m_ref:
                assert m_ref[k] == m_got[k], (step, k, m_ref[k], m_got[k])
        for k in ("reasoning/pg_loss", "meta_thinking/pg_loss", "reasoning/ratio_mean", "meta_thinking/ratio_mean"):
            if k in m_ref:
                assert abs(m_ref[k] - m_got[k]) < 1e-5, (step, k, m_ref[k], m_got[k])
        assert any(k in m_ref for k in EXACT_METRICS[:2]) and "train/accuracy" in m_ref


@pytest.mark.real_model
def test_mesh_params_are_really_sharded(runs):
    # tiny model: hidden 32 (embed → fsdp), 4 q heads × 8, vocab 49152 (tensor=1), LoRA rank 4
    s = runs["2x4x1"]["shards"]
    assert s["base_q"] == [8, 32] and s["base_embed"] == [49152, 8] and s["n_base_q_shards"] == 8
    assert s["lora_a"] == [8, 4] and s["lora_a_mu"] == [8, 4]
    # the memory plan sees the sharding: fsdp=4 and the batch over 8 devices store less per device
    assert runs["2x4x1"]["memory_peak"] < runs["single"]["memory_peak"] / 4


@pytest.mark.real_model
def test_memory_plan_is_printed(runs):
    out = runs["single"]["stdout"]
    assert "memory plan per device" in out and "kv cache" in out and "peak" in out
    assert "memory check skipped: cpu reports no memory limit" in out


def test_batch_rows_must_split_over_the_mesh():
    from rema_jax.config_utils import ConfigError

    with pytest.raises(ConfigError, match="not divisible by mesh data × fsdp = 3"):
        _config((3, 1, 1))
    with pytest.raises(ConfigError, match="mesh"):
        _config((2, 0, 1))


@pytest.mark.real_model
def test_run_that_cannot_fit_is_refused_with_the_breakdown(tmp_path, smollm2_gguf):
    from rema_jax.sharding import MemoryPlanError
    from rema_jax.training import trainer as trainer_lib
    from rema_jax.training.config import load_train_config

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import tiny_train_config

    cfg = load_train_config(tiny_train_config(memory={"device_bytes": 2**20}))
    with pytest.raises(MemoryPlanError, match="needs .* GiB per device") as e:
        trainer_lib.Trainer(cfg, str(tmp_path))
    assert "optimizer state" in str(e.value) and "kv cache" in str(e.value)


if __name__ == "__main__":
    _worker(sys.argv[1], [tuple(m) if m else None for m in json.loads(sys.argv[2])])
