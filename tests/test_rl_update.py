"""Masked multi-agent update on a toy bigram policy: learning, frozen agents, NaN guard, jit."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    return tree["embed"][rl.as_train_batch(batch).tokens] @ tree["out"]


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
    return {
        "tokens": tokens,
        "attention_mask": np.ones_like(tokens),
        "loss_mask": mask,
        "turn_ids": tid,
        "group_ids": np.arange(n) // group,
        "rewards": rewards,
    }


DEFAULT_ADVANTAGE = rl.AdvantageConfig()


def add_rl_fields(batch, params, role, logprob_fn, adv_cfg=DEFAULT_ADVANTAGE):
    b = dict(batch)
    b["advantages"] = np.asarray(
        rl.compute_advantages(adv_cfg, rewards_b=b["rewards"], group_ids_b=b["group_ids"], loss_mask_bt=b["loss_mask"])
    )
    b["old_logprobs"] = np.asarray(logprob_fn(params, role, b))
    return b


def expected_reward(tree, seed=123):
    return float(rollout(tree, jax.random.PRNGKey(seed), n=512)["rewards"].mean())


LOSS = rl.LossConfig(ratio_mode="turn_geometric", agg_mode="trajectory_mean", max_turns=2)
OPT = rl.OptimizerConfig(learning_rate=0.05, weight_decay=0.0)


def test_alternating_phases_learn_and_frozen_agent_is_bit_identical():
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_mini_batches=2, num_micro_batches=2))
    logprob_fn = rl.compute_logprobs_fn(toy_logits_fn)
    params = {"meta_thinking": toy_tree(jax.random.PRNGKey(0)), "reasoning": toy_tree(jax.random.PRNGKey(1))}
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
    for k in ("reasoning/clip_frac", "grad_norm", "lr", "loss", "reasoning/entropy"):
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
        batches = {
            r: add_rl_fields(rollout(state.params["shared"], k), state.params, r, logprob_fn)
            for r, k in (("meta_thinking", k1), ("reasoning", k2))
        }
        state, metrics = update(state, batches, trained=("shared",))
    assert expected_reward(state.params["shared"]) > before + 0.25
    assert "meta_thinking/pg_loss" in metrics and "reasoning/pg_loss" in metrics


def _one_batch(seed=0):
    params = {"meta_thinking": toy_tree(jax.random.PRNGKey(seed)), "reasoning": toy_tree(jax.random.PRNGKey(9))}
    batch = add_rl_fields(
        rollout(params["reasoning"], jax.random.PRNGKey(seed)),
        params,
        "reasoning",
        rl.compute_logprobs_fn(toy_logits_fn),
    )
    return params, batch


def _off_policy(batch, seed=0):
    """Old log-probs shifted unevenly: ratios != 1 and differing per token (a non-zero loss)."""
    shift = np.random.default_rng(seed).uniform(0.0, 0.3, batch["old_logprobs"].shape)
    return (batch["old_logprobs"] - shift * batch["loss_mask"]).astype(np.float32)


def _adam_moments(agent_state):
    """(mu, nu) of one agent's AdamW state."""
    (adam,) = [
        s
        for s in jax.tree_util.tree_leaves(agent_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return adam.mu, adam.nu


def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("mini", [1, 2])
def test_micro_batching_matches_full_batch(mini):
    """Gradient accumulation over k micro-batches is the full mini-batch's step: same loss, same
    gradient (hence the same AdamW moments: mu is linear in the gradient, nu quadratic, so a
    mean-instead-of-sum accumulation that Adam's normalisation hides in the params shows here)
    and the same parameters. max_grad_norm is huge so the clip cannot mask a scale error."""
    params, batch = _one_batch()
    batch["old_logprobs"] = _off_policy(batch)
    optimizer = rl.MultiAgentOptimizer(dataclasses.replace(OPT, max_grad_norm=1e9))
    outs = []
    for micro in (1, 4):
        update = rl.make_update_fn(
            toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_mini_batches=mini, num_micro_batches=micro)
        )
        state, metrics = update(rl.init_rl_state(params, optimizer), {"reasoning": batch}, trained=("reasoning",))
        assert bool(metrics["finite"])
        outs.append((state, metrics))
    (s1, m1), (sk, mk) = outs
    assert abs(float(m1["loss"])) > 1e-3  # a non-trivial loss, so equality means something
    np.testing.assert_allclose(float(mk["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(mk["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    mu1, nu1 = _adam_moments(s1.opt_state["reasoning"])
    muk, nuk = _adam_moments(sk.opt_state["reasoning"])
    _close(muk, mu1)
    _close(nuk, nu1, atol=1e-12)
    assert int(rl.agent_step_count(sk.opt_state["reasoning"])) == mini
    _close(sk.params["reasoning"], s1.params["reasoning"])
    assert opt_mod.tree_bitwise_equal(sk.params["meta_thinking"], params["meta_thinking"])


def test_micro_batching_keeps_role_loss_metrics():
    params, batch = _one_batch()
    batch["old_logprobs"] = _off_policy(batch)
    optimizer = rl.MultiAgentOptimizer(OPT)
    mets = []
    for micro in (1, 4):
        update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_micro_batches=micro))
        _, m = update(rl.init_rl_state(params, optimizer), {"reasoning": batch}, trained=("reasoning",))
        mets.append(m)
    np.testing.assert_allclose(float(mets[0]["reasoning/pg_loss"]), float(mets[0]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(mets[1]["reasoning/pg_loss"]), float(mets[0]["reasoning/pg_loss"]), rtol=1e-5)


def test_non_finite_update_leaves_state_unchanged():
    params, batch = _one_batch()
    optimizer = rl.MultiAgentOptimizer(OPT)
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_mini_batches=2))
    state = rl.init_rl_state(params, optimizer)
    state, _ = update(state, {"reasoning": batch}, trained=("reasoning",))  # a real step first
    snapshot = jax.tree_util.tree_map(np.array, state)
    bad = dict(batch)
    bad["advantages"] = batch["advantages"].copy()
    bad["advantages"][-1, 2] = np.nan  # only the 2nd mini-batch is bad
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
    update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(old_logprobs="recompute"))
    with pytest.raises(ValueError, match="not in the trainable params"):
        update(state, {"reasoning": batch}, trained=("critic",))
    with pytest.raises(ValueError, match="missing \\['old_logprobs'\\]"):
        update(state, {"reasoning": {k: v for k, v in batch.items() if k != "old_logprobs"}}, trained=("reasoning",))
    bad = dict(batch, turn_ids=batch["turn_ids"] + 5)
    with pytest.raises(ValueError, match="max_turns"):
        update(state, {"reasoning": bad}, trained=("reasoning",))


def test_old_logprobs_config():
    assert rl.UpdateConfig().old_from_update  # auto, one mini-batch
    assert not rl.UpdateConfig(num_mini_batches=2).old_from_update  # auto falls back to the pass
    assert not rl.UpdateConfig(old_logprobs="recompute").old_from_update
    assert rl.UpdateConfig(old_logprobs="in_update", num_micro_batches=4).old_from_update
    with pytest.raises(ValueError, match="needs num_mini_batches == 1"):
        rl.UpdateConfig(old_logprobs="in_update", num_mini_batches=2)
    with pytest.raises(ValueError, match="old_logprobs must be one of"):
        rl.UpdateConfig(old_logprobs="sampler")


@pytest.mark.parametrize("micro", [1, 4])
def test_old_logprobs_from_the_update_equal_the_recomputed_pass(micro):
    """With one mini-batch, π_old = stop_gradient(π_θ) inside the update gives the step that the
    recomputed π_old gives (same loss, gradient, Adam moments and parameters to fp32 rounding),
    with approx_kl exactly 0; the behaviour gap is mean |behaviour − π_old| over the drawn loss tokens
    either way."""
    params, batch = _one_batch()
    rng = np.random.default_rng(0)
    drawn = (rng.uniform(size=batch["loss_mask"].shape) < 0.8).astype(np.float32) * batch["loss_mask"]
    noise = rng.uniform(-0.01, 0.01, drawn.shape).astype(np.float32)
    batch["behaviour_logprobs"] = (batch["old_logprobs"] + noise) * drawn
    batch["behaviour_mask"] = drawn
    want_gap = float(np.abs(noise)[drawn > 0].mean())
    optimizer = rl.MultiAgentOptimizer(dataclasses.replace(OPT, max_grad_norm=1e9))
    runs = {}
    for source in ("recompute", "in_update"):
        update = rl.make_update_fn(
            toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_micro_batches=micro, old_logprobs=source)
        )
        b = batch if source == "recompute" else {k: v for k, v in batch.items() if k != "old_logprobs"}
        state, m = update(rl.init_rl_state(params, optimizer), {"reasoning": b}, trained=("reasoning",))
        assert bool(m["finite"])
        runs[source] = (state, m)
    (s_re, m_re), (s_in, m_in) = runs["recompute"], runs["in_update"]
    assert float(m_in["reasoning/approx_kl"]) == 0.0 and float(m_in["reasoning/clip_frac"]) == 0.0
    assert abs(float(m_re["reasoning/approx_kl"])) < 1e-6
    assert float(m_re["grad_norm"]) > 1e-3  # a real gradient, so equality means something
    for k in ("loss", "grad_norm", "reasoning/pg_loss", "reasoning/ratio_mean", "reasoning/entropy"):
        np.testing.assert_allclose(float(m_in[k]), float(m_re[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for m in (m_re, m_in):
        np.testing.assert_allclose(float(m["reasoning/behaviour_logprob_gap"]), want_gap, rtol=1e-4)
        assert float(m["reasoning/behaviour_gap_count"]) == drawn.sum()
    _close(_adam_moments(s_in.opt_state["reasoning"]), _adam_moments(s_re.opt_state["reasoning"]), atol=1e-10)
    _close(s_in.params["reasoning"], s_re.params["reasoning"])


def test_schedules_and_optimizer_config():
    s = rl.make_schedule(rl.OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=2, decay_steps=10))
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 10)], [0, 0.5, 1.0, 0.0], atol=1e-6)
    s = rl.make_schedule(rl.OptimizerConfig(learning_rate=1.0, schedule="linear", decay_steps=4, end_lr_ratio=0.5))
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


def _numpy_adam(grads_by_step, p0, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Reference Adam (no weight decay) on already-clipped gradients."""
    p, m, v = np.array(p0, np.float64), 0.0, 0.0
    for t, g in enumerate(grads_by_step, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_gradient_clipping_is_global_over_trained_agents():
    """The update optax applies is built from the globally clipped gradient.

    Step 1: trained agents a, b have gradients of global norm 5 -> every gradient is scaled by
    1/5 (per-agent clipping would scale a by 1/3 and b by 1/4). Step 2's gradient (norm < 1) is
    not clipped. Adam's first step hides a gradient scale, so the check is on the moments after
    step 1 and on the parameters after step 2 (a numpy Adam on the clipped gradients). The
    frozen agent c (not trained) is neither clipped against nor moved.
    """
    lr = 0.1
    optimizer = rl.MultiAgentOptimizer(rl.OptimizerConfig(learning_rate=lr, max_grad_norm=1.0, weight_decay=0.0))
    params = {
        "a": {"w": jnp.array([1.0, 2.0])},
        "b": {"w": jnp.array([-1.0, 0.5])},
        "c": {"w": jnp.array([7.0])},
        "d": None,
    }
    state = optimizer.init(params)
    g1 = {"a": {"w": jnp.array([3.0, 0.0])}, "b": {"w": jnp.array([0.0, 4.0])}}
    g2 = {"a": {"w": jnp.array([0.3, -0.1])}, "b": {"w": jnp.array([-0.2, 0.1])}}
    p1, s1, met = optimizer.step(g1, state, params, ("a", "b"))
    assert float(met["grad_norm"]) == pytest.approx(5.0)  # logged before the clip
    for agent in ("a", "b"):
        mu, nu = _adam_moments(s1[agent])
        clipped = np.asarray(g1[agent]["w"]) / 5.0
        np.testing.assert_allclose(mu["w"], 0.1 * clipped, rtol=1e-6)
        np.testing.assert_allclose(nu["w"], 0.001 * clipped**2, rtol=1e-6)
    p2, s2, met2 = optimizer.step(g2, s1, p1, ("a", "b"))
    assert float(met2["grad_norm"]) == pytest.approx(np.sqrt(0.15), rel=1e-6)
    for agent in ("a", "b"):
        clipped_steps = [np.asarray(g1[agent]["w"]) / 5.0, np.asarray(g2[agent]["w"])]
        expected = _numpy_adam(clipped_steps, params[agent]["w"], lr)
        np.testing.assert_allclose(p2[agent]["w"], expected, rtol=1e-5, atol=1e-6)
        unclipped = _numpy_adam([g1[agent]["w"], g2[agent]["w"]], params[agent]["w"], lr)
        assert np.abs(expected - unclipped).max() > 5e-3  # the check tells the two apart
    for s in (s1, s2):
        assert s["d"] is None and opt_mod.tree_bitwise_equal(s["c"], state["c"])
    assert opt_mod.tree_bitwise_equal(p2["c"], params["c"]) and p2["d"] is None


def test_update_applies_the_clipped_gradient():
    """Through make_update_fn: with a tiny max_grad_norm the gradient optax receives (read back
    from AdamW's first moment, mu = (1 - b1) g) is the unclipped gradient scaled to norm
    max_grad_norm, in the same direction."""
    params, batch = _one_batch()
    batch["old_logprobs"] = _off_policy(batch)
    grads = {}
    for max_norm in (1e9, 1e-3):
        optimizer = rl.MultiAgentOptimizer(dataclasses.replace(OPT, max_grad_norm=max_norm))
        update = rl.make_update_fn(toy_logits_fn, LOSS, optimizer, rl.UpdateConfig(num_micro_batches=2))
        state, metrics = update(rl.init_rl_state(params, optimizer), {"reasoning": batch}, trained=("reasoning",))
        mu, _ = _adam_moments(state.opt_state["reasoning"])
        grads[max_norm] = jax.tree_util.tree_map(lambda x: np.asarray(x) / 0.1, mu)
        norm = float(metrics["grad_norm"])
    raw, clipped = grads[1e9], grads[1e-3]
    assert norm > 1e-2  # the clip is active
    np.testing.assert_allclose(float(optax.global_norm(raw)), norm, rtol=1e-5)
    np.testing.assert_allclose(float(optax.global_norm(clipped)), 1e-3, rtol=1e-5)
    _close(clipped, jax.tree_util.tree_map(lambda g: g * (1e-3 / norm), raw), rtol=1e-5, atol=1e-12)
