"""Masked multi-agent update on a toy bigram policy: learning, frozen agents, NaN guard, jit."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax import rl
from rema_jax.rl import optimizer as opt_mod

V, H, GEN, TARGET = 6, 8, 5, 3
TRACES = {"n": 0}


def toy_tree(key):
    k1, k2 = jax.random.split(key)
    return {"embed": 0.1 * jax.random.normal(k1, (V, H)), "out": 0.1 * jax.random.normal(k2, (H, V))}


def toy_logits_fn(params, role, batch):
    TRACES["n"] += 1  # runs only when traced
    tree = params["shared"] if "shared" in params else params[role]
    return tree["embed"][batch["tokens"]] @ tree["out"]


@functools.partial(jax.jit, static_argnums=2)
def _sample(tree, key, n):
    def step(tok, k):
        nxt = jax.random.categorical(k, tree["embed"][tok] @ tree["out"])
        return nxt, nxt
    _, gen = jax.lax.scan(step, jnp.zeros((n,), jnp.int32), jax.random.split(key, GEN))
    return jnp.concatenate([jnp.zeros((n, 1), jnp.int32), gen.T.astype(jnp.int32)], 1)


def rollout(tree, key, n=16, group=4):
    """Contract-4 batch: position 0 is the prompt, 5 generated tokens in 2 turns."""
    tokens = np.asarray(_sample(tree, key, n))
    mask = np.ones_like(tokens, np.float32)
    mask[:, 0] = 0
    tid = np.array([[-1, 0, 0, 1, 1, 1]] * n, np.int32)
    rewards = (tokens[:, 1:] == TARGET).mean(1).astype(np.float32)
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": mask,
            "turn_ids": tid, "group_ids": np.arange(n) // group, "rewards": rewards}


def add_rl_fields(batch, params, role, logprob_fn, adv_cfg=rl.AdvantageConfig()):
    b = dict(batch)
    b["advantages"] = np.asarray(rl.compute_advantages(
        adv_cfg, rewards_n=b["rewards"], group_ids_n=b["group_ids"], loss_mask_nl=b["loss_mask"]))
    b["old_logprobs"] = np.asarray(logprob_fn(params, role, b))
    return b


def expected_reward(tree, seed=123):
    return float(rollout(tree, jax.random.PRNGKey(seed), n=512)["rewards"].mean())


LOSS = rl.LossConfig(ratio_mode="turn_geometric", agg_mode="trajectory_mean", max_turns=2)
OPT = rl.OptimizerConfig(learning_rate=0.05, weight_decay=0.0)


def test_alternating_phases_learn_and_frozen_agent_is_bit_identical():
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer,
                               rl.UpdateConfig(num_mini_batches=2, num_micro_batches=2))
    logprob_fn = rl.compute_logprobs_fn(toy_logits_fn)
    params = {"meta_thinking": toy_tree(jax.random.PRNGKey(0)),
              "reasoning": toy_tree(jax.random.PRNGKey(1))}
    state = rl.init_rl_state(params, optimizer)
    key = jax.random.PRNGKey(42)
    for role in ("reasoning", "meta_thinking"):
        other = "meta_thinking" if role == "reasoning" else "reasoning"
        frozen_params = jax.tree_util.tree_map(np.array, state.params[other])
        frozen_opt = jax.tree_util.tree_map(np.array, state.opt_state[other])
        before = expected_reward(state.params[role])
        traces_after_first = None
        for step in range(30):
            key, sub = jax.random.split(key)
            batch = add_rl_fields(rollout(state.params[role], sub), state.params, role, logprob_fn)
            state, metrics = update(state, {role: batch}, trained=(role,))
            assert bool(metrics["finite"])
            if step == 1:
                traces_after_first = TRACES["n"]
        assert TRACES["n"] == traces_after_first, "recompiled between steps"
        after = expected_reward(state.params[role])
        assert after > before + 0.25, (role, before, after)
        assert opt_mod.tree_bitwise_equal(state.params[other], frozen_params)
        assert opt_mod.tree_bitwise_equal(state.opt_state[other], frozen_opt)
        assert int(rl.agent_step_count(state.opt_state[role])) == 60  # 30 updates x 2 mini-batches
    for k in (f"reasoning/clip_frac", "grad_norm", "lr", "loss", "reasoning/entropy"):
        assert k in metrics or k.replace("reasoning", "meta_thinking") in metrics


def test_shared_simultaneous_learns():
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer)
    logprob_fn = rl.compute_logprobs_fn(toy_logits_fn, num_micro_batches=2)
    state = rl.init_rl_state({"shared": toy_tree(jax.random.PRNGKey(3))}, optimizer)
    before = expected_reward(state.params["shared"])
    key = jax.random.PRNGKey(7)
    for _ in range(25):
        key, k1, k2 = jax.random.split(key, 3)
        batches = {r: add_rl_fields(rollout(state.params["shared"], k), state.params, r, logprob_fn)
                   for r, k in (("meta_thinking", k1), ("reasoning", k2))}
        state, metrics = update(state, batches, trained=("shared",))
    assert expected_reward(state.params["shared"]) > before + 0.25
    assert "meta_thinking/pg_loss" in metrics and "reasoning/pg_loss" in metrics


def _one_batch(seed=0):
    params = {"meta_thinking": toy_tree(jax.random.PRNGKey(seed)), "reasoning": toy_tree(jax.random.PRNGKey(9))}
    batch = add_rl_fields(rollout(params["reasoning"], jax.random.PRNGKey(seed)), params, "reasoning",
                          rl.compute_logprobs_fn(toy_logits_fn))
    return params, batch


def test_micro_batching_matches_full_batch():
    params, batch = _one_batch()
    batch["old_logprobs"] = batch["old_logprobs"] - 0.1  # off-policy: ratios != 1
    optimizer = rl.MultiAgentOptimizer(OPT)
    outs = []
    for micro in (1, 4):
        update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_micro_batches=micro))
        state, _ = update(rl.init_rl_state(params, optimizer), {"reasoning": batch}, trained=("reasoning",))
        outs.append(state.params["reasoning"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *outs)


def test_non_finite_update_leaves_state_unchanged():
    params, batch = _one_batch()
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_mini_batches=2))
    state = rl.init_rl_state(params, optimizer)
    state, _ = update(state, {"reasoning": batch}, trained=("reasoning",))  # a real step first
    snapshot = jax.tree_util.tree_map(np.array, state)
    bad = dict(batch)
    bad["advantages"] = batch["advantages"].copy()
    bad["advantages"][-1, 2] = np.nan                     # only the 2nd mini-batch is bad
    new_state, metrics = update(state, {"reasoning": bad}, trained=("reasoning",))
    assert not bool(metrics["finite"])
    assert opt_mod.tree_bitwise_equal(new_state, snapshot)


def test_compute_logprobs_matches_loss_logprobs():
    params, batch = _one_batch()
    lp = rl.compute_logprobs_fn(toy_logits_fn, num_micro_batches=4)(params, "reasoning", batch)
    logits = toy_logits_fn(params, "reasoning", batch)
    ref, _ = rl.token_logprobs_and_entropy(logits, jnp.asarray(batch["tokens"]))
    np.testing.assert_allclose(lp, np.asarray(ref) * batch["loss_mask"], rtol=1e-6, atol=1e-6)


def test_update_input_errors():
    params, batch = _one_batch()
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_mini_batches=3))
    state = rl.init_rl_state(params, optimizer)
    with pytest.raises(ValueError, match="not divisible"):
        update(state, {"reasoning": batch}, trained=("reasoning",))
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer)
    with pytest.raises(ValueError, match="not in the trainable params"):
        update(state, {"reasoning": batch}, trained=("critic",))
    with pytest.raises(ValueError, match="missing \\['old_logprobs'\\]"):
        update(state, {"reasoning": {k: v for k, v in batch.items() if k != "old_logprobs"}},
               trained=("reasoning",))
    bad = dict(batch, turn_ids=batch["turn_ids"] + 5)
    with pytest.raises(ValueError, match="max_turns"):
        update(state, {"reasoning": bad}, trained=("reasoning",))


def test_schedules_and_optimizer_config():
    s = rl.make_schedule(rl.OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=2,
                                            decay_steps=10))
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 10)], [0, 0.5, 1.0, 0.0], atol=1e-6)
    s = rl.make_schedule(rl.OptimizerConfig(learning_rate=1.0, schedule="linear", decay_steps=4,
                                            end_lr_ratio=0.5))
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 8)], [1.0, 0.75, 0.5, 0.5], atol=1e-6)
    s = rl.make_schedule(rl.OptimizerConfig(learning_rate=1.0, warmup_steps=4))
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 100)], [0, 0.5, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="valid: \\('constant', 'cosine', 'linear'\\)"):
        rl.OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="decay_steps"):
        rl.OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="num_mini_batches"):
        rl.UpdateConfig(num_mini_batches=0)
    assert dataclasses.is_dataclass(rl.OptimizerConfig) and rl.OptimizerConfig().weight_decay == 0.01


def test_gradient_clipping_is_global_over_trained_agents():
    optimizer = rl.MultiAgentOptimizer(rl.OptimizerConfig(learning_rate=1.0, max_grad_norm=1.0))
    params = {"a": {"w": jnp.zeros(2)}, "b": {"w": jnp.zeros(2)}, "c": None}
    state = optimizer.init(params)
    grads = {"a": {"w": jnp.array([3.0, 0.0])}, "b": {"w": jnp.array([0.0, 4.0])}}
    _, _, met = optimizer.step(grads, state, params, ("a", "b"))
    assert float(met["grad_norm"]) == pytest.approx(5.0)
    assert state["c"] is None
