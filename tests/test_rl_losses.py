"""PPO loss modes against a loop-based numpy reference; log-prob alignment; KL estimators."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.rl import losses as L


def _batch(seed=0, b=5, l=14, k=3):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, l), np.float32)
    tid = -np.ones((b, l), np.int32)
    for i in range(b):
        pos = 1
        for t in range(rng.integers(1, k + 1)):
            pos += rng.integers(0, 2)  # gap (other role / template)
            n = rng.integers(1, 4)
            mask[i, pos : pos + n] = 1
            tid[i, pos : pos + n] = t
            pos += n
    mask[-1] = 0  # a sequence with no loss tokens
    tid[-1] = -1
    logp = rng.normal(-1.0, 0.5, (b, l)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (b, l))).astype(np.float32)
    advs = np.repeat(rng.normal(size=(b, 1)), l, 1).astype(np.float32)
    advs[1] = -np.abs(advs[1]) - 0.5
    return logp, old, advs * mask, mask, tid


SUM_NORM = "seq_mean_token_sum_norm"
NORM = 7.0  # the Dr.GRPO constant used in these tests


def _reference(logp, old, adv, mask, tid, ratio_mode, agg_mode, eps=0.2, c=3.0, lclip=3.0, norm=NORM):
    def pg(a, r):
        v = max(-a * r, -a * np.clip(r, 1 - eps, 1 + eps))
        return min(v, -a * c) if a < 0 else v

    units = {}  # (seq, turn) -> per-token values (turn modes: the turn value on each of its tokens)
    for i in range(mask.shape[0]):
        for k in sorted(set(tid[i][mask[i] > 0].tolist())):
            sel = (tid[i] == k) & (mask[i] > 0)
            lr = logp[i][sel] - old[i][sel]
            if ratio_mode == "token":
                units[(i, k)] = [pg(a, np.exp(x)) for a, x in zip(adv[i][sel], lr)]
            else:
                r = (
                    np.exp(min(lr.mean(), lclip))
                    if ratio_mode == "turn_geometric"
                    else np.mean(np.exp(np.minimum(lr, lclip)))
                )
                units[(i, k)] = [pg(adv[i][sel].mean(), r)] * int(sel.sum())
    if agg_mode == SUM_NORM:  # Dr.GRPO: per-sequence token sum / constant, mean over sequences
        seqs = sorted({i for i, _ in units})
        return np.mean([sum(v for (j, _), vs in units.items() if j == i for v in vs) / norm for i in seqs])
    if agg_mode == "token_mean":
        vals = [v for vs in units.values() for v in vs]
        return np.mean(vals)
    if agg_mode == "turn_mean":
        return np.mean([np.mean(vs) for vs in units.values()])
    seqs = sorted({i for i, _ in units})
    if ratio_mode == "token":
        return np.mean([np.mean([v for (j, _), vs in units.items() if j == i for v in vs]) for i in seqs])
    return np.mean([np.mean([vs[0] for (j, _), vs in units.items() if j == i]) for i in seqs])


COMBOS = [(r, a) for r, a in itertools.product(L.RATIO_MODES, L.AGG_MODES) if not (r != "token" and a == "token_mean")]


def _cfg(ratio_mode, agg_mode, **kw):
    norm = {"token_sum_norm": NORM} if agg_mode == SUM_NORM else {}
    return L.LossConfig(ratio_mode=ratio_mode, agg_mode=agg_mode, **norm, **kw)


@pytest.mark.parametrize(
    "ratio_mode,agg_mode", COMBOS + [(r, SUM_NORM) for r in L.RATIO_MODES if (r, SUM_NORM) not in COMBOS]
)
def test_loss_matches_reference(ratio_mode, agg_mode):
    logp, old, adv, mask, tid = _batch()
    cfg = _cfg(ratio_mode, agg_mode, max_turns=4)
    loss, met = L.ppo_loss(jnp.asarray(logp), old, adv, mask, tid, cfg)
    np.testing.assert_allclose(
        float(loss), _reference(logp, old, adv, mask, tid, ratio_mode, agg_mode), rtol=1e-5, atol=1e-6
    )
    assert 0.0 <= float(met["clip_frac"]) <= 1.0 and float(met["ratio_max"]) > 0


def test_on_policy_gradient_is_policy_gradient():
    """At ratio 1 the gradient w.r.t. logp is -A / (normaliser): the plain policy gradient."""
    _, _, adv, mask, tid = _batch(3)
    logp = np.random.default_rng(3).normal(size=mask.shape).astype(np.float32)
    cfg = L.LossConfig(ratio_mode="token", agg_mode="token_mean", max_turns=4)
    g = jax.grad(lambda lp: L.ppo_loss(lp, logp, adv, mask, tid, cfg)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(g), -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)


def test_dr_grpo_sum_norm_gradient_does_not_depend_on_length():
    """seq_mean_token_sum_norm at ratio 1: d loss / d logp_t = -A_t / (C * #sequences) for every
    token, however long its sequence (token_mean / trajectory_mean scale by 1/length)."""
    _, _, adv, mask, tid = _batch(3)
    logp = np.random.default_rng(3).normal(size=mask.shape).astype(np.float32)
    n_seq = int((mask.sum(1) > 0).sum())
    for ratio_mode in L.RATIO_MODES:
        cfg = _cfg(ratio_mode, SUM_NORM, max_turns=4, dual_clip_c=None)
        g = jax.grad(lambda lp: L.ppo_loss(lp, logp, adv, mask, tid, cfg)[0])(jnp.asarray(logp))
        if ratio_mode == "token":  # turn ratios share each turn's gradient across its tokens
            np.testing.assert_allclose(np.asarray(g), -adv * mask / (NORM * n_seq), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(jnp.sum(g * mask)), float(-(adv * mask).sum() / (NORM * n_seq)), rtol=1e-5)


def test_sum_norm_needs_its_constant():
    logp, old, adv, mask, tid = _batch()
    with pytest.raises(ValueError, match="token_sum_norm"):
        L.ppo_loss(logp, old, adv, mask, tid, L.LossConfig(agg_mode=SUM_NORM, max_turns=4))
    with pytest.raises(ValueError, match="token_sum_norm must be > 0"):
        L.LossConfig(agg_mode=SUM_NORM, token_sum_norm=0.0)
    with pytest.raises(ValueError, match="only used by agg_mode='seq_mean_token_sum_norm'"):
        L.LossConfig(agg_mode="trajectory_mean", token_sum_norm=8.0)


@pytest.mark.parametrize("ratio_mode,agg_mode", COMBOS)
def test_rows_without_loss_tokens_change_nothing(ratio_mode, agg_mode):
    """An all-zero loss-mask row (e.g. a padding row) leaves the loss, its gradient and the
    normalisers unchanged: sequence counts only include rows with a loss token."""
    logp, old, adv, mask, tid = _batch(11, b=4)
    logp, old, adv, mask, tid = (x[:3] for x in (logp, old, adv, mask, tid))  # 3 rows with tokens
    assert (mask.sum(1) > 0).all()
    ins = lambda x, v: np.insert(x, 1, v, axis=0)  # noqa: E731   a row with no loss token at 1
    padded = (ins(logp, -1.0), ins(old, -2.0), ins(adv, 0.0), ins(mask, 0.0), ins(tid, -1))
    cfg = _cfg(ratio_mode, agg_mode, max_turns=4)
    loss_fn = lambda lp, o, a, m, t: L.ppo_loss(lp, o, a, m, t, cfg)[0]  # noqa: E731
    base, g_base = jax.value_and_grad(loss_fn)(jnp.asarray(logp), old, adv, mask, tid)
    loss, g = jax.value_and_grad(loss_fn)(jnp.asarray(padded[0]), *padded[1:])
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(float(loss), float(base), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g), ins(np.asarray(g_base), 0.0), rtol=1e-6, atol=1e-8)


def test_dual_clip_caps_negative_advantages():
    cfg = L.LossConfig(ratio_mode="token", agg_mode="token_mean", max_turns=1)
    mask = np.array([[0, 1]], np.float32)
    tid = np.array([[-1, 0]])
    old = np.zeros((1, 2), np.float32)
    logp = np.array([[0.0, 2.0]], np.float32)  # ratio e^2 = 7.39 > c = 3
    loss, met = L.ppo_loss(logp, old, np.array([[0, -1.0]], np.float32), mask, tid, cfg)
    assert float(loss) == pytest.approx(3.0) and float(met["dual_clip_frac"]) == 1.0
    loss, met = L.ppo_loss(logp, old, np.array([[0, 1.0]], np.float32), mask, tid, cfg)
    assert float(loss) == pytest.approx(-1.2) and float(met["clip_frac"]) == 1.0
    no_dual = L.LossConfig(ratio_mode="token", agg_mode="token_mean", max_turns=1, dual_clip_c=None)
    loss, _ = L.ppo_loss(logp, old, np.array([[0, -1.0]], np.float32), mask, tid, no_dual)
    assert float(loss) == pytest.approx(np.exp(2.0), rel=1e-5)


def test_turn_log_ratio_preclip():
    cfg = L.LossConfig(ratio_mode="turn_geometric", agg_mode="turn_mean", max_turns=1, dual_clip_c=None)
    mask = np.array([[0, 1, 1]], np.float32)
    tid = np.array([[-1, 0, 0]])
    logp = np.array([[0, 10.0, 10.0]], np.float32)
    _, met = L.ppo_loss(logp, np.zeros_like(logp), -mask, mask, tid, cfg)
    assert float(met["ratio_max"]) == pytest.approx(np.exp(3.0), rel=1e-5)


def test_normalizers_make_micro_batches_additive():
    logp, old, adv, mask, tid = _batch(5, b=6)
    for r, a in COMBOS:
        cfg = _cfg(r, a, max_turns=4)
        full, _ = L.ppo_loss(logp, old, adv, mask, tid, cfg)
        norms = L.loss_normalizers(jnp.asarray(mask), jnp.asarray(tid), 4)
        parts = [
            L.ppo_loss(logp[s], old[s], adv[s], mask[s], tid[s], cfg, normalizers=norms)[0]
            for s in (slice(0, 2), slice(2, 6))
        ]
        np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-5, atol=1e-6)


def test_kl_and_entropy_terms():
    logp, old, adv, mask, tid = _batch(7)
    ref = old - 0.3
    base = L.LossConfig(ratio_mode="token", agg_mode="token_mean", max_turns=4)
    with_kl = L.LossConfig(
        ratio_mode="token", agg_mode="token_mean", max_turns=4, kl_coef=0.5, kl_estimator="k1", entropy_coef=0.1
    )
    ent = np.full_like(logp, 2.0)
    l0, _ = L.ppo_loss(logp, old, adv, mask, tid, base)
    l1, met = L.ppo_loss(logp, old, adv, mask, tid, with_kl, ref_logp_bt=ref, entropy_bt=ent)
    k1 = ((logp - ref) * mask).sum() / mask.sum()
    assert float(l1) == pytest.approx(float(l0) + 0.5 * k1 - 0.1 * 2.0, rel=1e-5)
    assert float(met["kl_ref"]) == pytest.approx(k1, rel=1e-5)
    with pytest.raises(ValueError, match="no ref_logp_bt"):
        L.ppo_loss(logp, old, adv, mask, tid, with_kl)


def test_kl_estimators():
    lp, ref = jnp.array([0.0, -1.0, -30.0]), jnp.array([0.0, -2.0, 0.0])
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k1"), [0, 1, -10])  # clamped
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k2"), [0, 0.5, 10])
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k3"), [0, np.exp(-1) + 1 - 1, 10], rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 1, 3, 5, 100])
def test_token_logprobs_alignment_and_chunking(chunk):
    rng = np.random.default_rng(0)
    b, t, v = 2, 7, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    logp, ent = L.token_logprobs_and_entropy(jnp.asarray(logits, jnp.bfloat16), tokens, 2.0, chunk_size=chunk)
    x = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)) / 2.0
    lsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    assert logp.dtype == jnp.float32 and np.all(np.asarray(logp[:, 0]) == 0)
    np.testing.assert_allclose(
        logp[:, 1:], np.take_along_axis(lsm[:, :-1], tokens[:, 1:, None], -1)[..., 0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(ent[:, 1:], -(np.exp(lsm) * lsm).sum(-1)[:, :-1], rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="valid: \\('token', 'turn_geometric', 'turn_arithmetic'\\)"):
        L.LossConfig(ratio_mode="seq")
    with pytest.raises(ValueError, match="rejected"):
        L.LossConfig(ratio_mode="turn_geometric", agg_mode="token_mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        L.LossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip_c"):
        L.LossConfig(dual_clip_c=0.5)


def test_sparse_logprobs_match_dense_at_loss_positions():
    from rema_jax.rl.losses import sparse_token_logprobs_and_entropy, token_logprobs_and_entropy

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 10, 17)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 17, size=(3, 10)))
    mask = np.zeros((3, 10), np.float32)
    mask[0, 4:8] = 1
    mask[1, [2, 3, 9]] = 1
    mask[2, 0] = 1  # position 0 never has a prediction
    dense_lp, dense_ent = token_logprobs_and_entropy(logits, tokens, 0.7)
    at_fn = lambda pos_bk: jnp.take_along_axis(logits, pos_bk[..., None], axis=1)  # noqa: E731
    lp, ent = sparse_token_logprobs_and_entropy(at_fn, tokens, mask, max_loss_tokens=4, temperature=0.7)
    m = mask.copy()
    m[:, 0] = 0
    np.testing.assert_allclose(lp, dense_lp * m, atol=1e-6)
    np.testing.assert_allclose(ent, dense_ent * m, atol=1e-6)


def _head_problem(seed: int, tied: bool, b: int = 3, k: int = 11, h: int = 8, v: int = 37):
    """(rng, hidden [b, k, h], head weight ([v, h] tied, else [h, v]), targets [b, k]), float32."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, k, h)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(v, h) if tied else (h, v)), jnp.float32)
    return rng, hidden, weight, jnp.asarray(rng.integers(0, v, size=(b, k)), jnp.int32)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_head_logprobs_match_one_block_values_and_gradients(tied):
    """The vocabulary projection + log-softmax over chunks of K (K = 11, not a multiple of the chunk)
    gives the single block's log-probs, entropies and gradients w.r.t. the hidden states and the
    head weight (a full agent trains it), for a tied ([V, H]) and an untied ([H, V]) head."""
    from rema_jax.models.transformer import HeadInputs
    from rema_jax.rl.losses import head_logprobs_and_entropy

    rng, hidden, weight, targets = _head_problem(1, tied)
    b, k = targets.shape
    w_lp = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)
    w_ent = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)

    def objective(hid, wt, chunk):
        lp, ent = head_logprobs_and_entropy(HeadInputs(hid, wt, tied), targets, 0.7, chunk)
        return jnp.sum(lp * w_lp) + jnp.sum(ent * w_ent), (lp, ent)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_ref, (lp_ref, ent_ref)) = grad(hidden, weight, 0)
    assert lp_ref.shape == ent_ref.shape == (b, k)
    for chunk in (1, 4, 5, 10):
        g, (lp, ent) = grad(hidden, weight, chunk)
        np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)  # |logp| ~ 10: fp32 rounding
        np.testing.assert_allclose(ent, ent_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(g, g_ref):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_head_never_holds_the_whole_logits_block():
    """XLA's own memory analysis of the gradient: in chunks of 8 of K = 64 positions the scratch is
    well under one [B, K, V] float32 block, which the single-block backward needs several of."""
    from rema_jax.models.transformer import HeadInputs
    from rema_jax.rl.losses import head_logprobs_and_entropy

    b, k, h, v = 4, 64, 16, 8192
    block = b * k * v * 4
    hidden = jnp.zeros((b, k, h), jnp.float32)
    weight = jnp.zeros((v, h), jnp.float32)
    targets = jnp.zeros((b, k), jnp.int32)

    def temp_bytes(chunk, frozen=False):
        def loss(hid):
            head = HeadInputs(hid, weight, True)
            lp, _ = head_logprobs_and_entropy(
                head, targets, 1.0, chunk, trained_head=not frozen, entropy_grad=not frozen
            )
            return jnp.sum(lp)

        return jax.jit(jax.grad(loss)).lower(hidden).compile().memory_analysis().temp_size_in_bytes

    one_block = temp_bytes(0)
    assert one_block >= block, (one_block, block)
    for frozen in (False, True):
        chunked = temp_bytes(8, frozen)
        assert chunked < block / 2, (frozen, chunked, block)


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_head_chunks_match_one_block(tied):
    """A head that is not trained and an entropy without gradient (a LoRA agent, entropy_coef = 0):
    the custom VJP that forms d logp / d h in the forward pass gives the single block's log-probs,
    entropies and hidden-state gradient (through the log-probs), and holds no [B, K, V] block."""
    from rema_jax.models.transformer import HeadInputs
    from rema_jax.rl.losses import head_logprobs_and_entropy

    rng, hidden, weight, targets = _head_problem(2, tied)
    w_lp = jnp.asarray(rng.normal(size=targets.shape), jnp.float32)

    def objective(hid, chunk, frozen):
        lp, ent = head_logprobs_and_entropy(
            HeadInputs(hid, weight, tied), targets, 0.7, chunk, trained_head=not frozen, entropy_grad=not frozen
        )
        return jnp.sum(jnp.square(lp * w_lp)), (lp, ent)  # nonlinear in logp: the cotangent varies

    grad = jax.jit(jax.grad(objective, has_aux=True), static_argnums=(1, 2))
    g_ref, (lp_ref, ent_ref) = grad(hidden, 0, False)
    for chunk in (1, 4, 10):
        g, (lp, ent) = grad(hidden, chunk, True)
        np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent, ent_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


def test_frozen_head_refuses_a_weight_gradient():
    """The frozen-head path closes over the weight: differentiating it there is an error (JAX's
    UnexpectedTracerError: the weight's tracer escapes the custom VJP), never a silent zero."""
    from rema_jax.models.transformer import HeadInputs
    from rema_jax.rl.losses import head_logprobs_and_entropy

    hidden, weight = jnp.ones((2, 6, 4)), jnp.ones((9, 4))
    targets = jnp.zeros((2, 6), jnp.int32)

    def loss(w):
        head = HeadInputs(hidden, w, True)
        return jnp.sum(head_logprobs_and_entropy(head, targets, 1.0, 2, trained_head=False, entropy_grad=False)[0])

    with pytest.raises(jax.errors.UnexpectedTracerError):
        jax.grad(loss)(weight)
