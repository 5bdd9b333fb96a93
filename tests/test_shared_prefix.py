"""Shared-prefix training passes (``rl.plan_prefix`` + ``models.forward_shared_prefix``) against the
plain path: the plan's groups, buckets and fallback; log-probs, loss and gradients of a tiny random
model within 1e-5 (fp32) for LoRA, full and shared agents on single- and multi-turn rows; the update
with micro-batches; one compilation for two steps of different content in the same bucket. The real
SmolLM2 on real rollout rows is one slow test.

Cheap on purpose (the suite has a time budget): one 2-layer model, one learner per agent kind built
once per module, and each pass compiled once per path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax import models, rl
from rema_jax.models.testing import random_params, tiny_config
from rema_jax.training.config import load_train_config
from rema_jax.training.layout import AgentLayout
from rema_jax.training.learner import Learner

TOL = 1e-5
T = 128
STEM = 60
# chunk 0: three prompts after one stem (and one without); chunk 1: two stems (two questions)
NESTED = dict(layout=((90, 90, 100, 70), (95, 95, 80, 85)), stems=((0, 0, 0, None), (1, 1, 1, 2)))
ROLE = "meta_thinking"


# ---------------------------------------------------------------------------- rows
def make_rows(seed: int, layout=((50, 50, 50, 44), (61, 61, 40, None)), stems=None):
    """Right-padded rows ``[B, T]`` in 2 chunks: each entry is a prompt id (rows with the same
    (chunk, length) share their prompt) or None (a row without loss tokens). Odd rows are
    multi-turn: turn 0, a user message (no loss), turn 1. ``stems`` (per chunk, per prompt entry:
    a stem id or None): prompts with the same stem id begin with the same STEM tokens (a question
    before different plans), otherwise prompts are random throughout."""
    rng = np.random.default_rng(seed)
    stem_tokens = {}
    rows = [x for chunk in layout for x in chunk]
    b = len(rows)
    tokens = np.zeros((b, T), np.int32)
    mask = np.zeros((b, T), np.int32)
    loss = np.zeros((b, T), np.float32)
    turns = np.full((b, T), -1, np.int32)
    prompts = {}
    for i, plen in enumerate(rows):
        chunk = i // len(layout[0])
        if plen is None:
            n = 30
            tokens[i, :n], mask[i, :n] = rng.integers(3, 128, n), 1
            continue
        prompt = prompts.setdefault((chunk, plen), rng.integers(3, 128, plen))
        stem = None if stems is None else stems[chunk][i % len(layout[0])]
        if stem is not None:
            prompt = prompt.copy()
            prompt[:STEM] = stem_tokens.setdefault(stem, rng.integers(3, 128, STEM))
        t1 = int(rng.integers(4, 9))
        pieces = [(prompt, 0, -1), (rng.integers(3, 128, t1), 1, 0)]
        if i % 2:
            pieces += [(rng.integers(3, 128, 5), 0, -1), (rng.integers(3, 128, t1 + 2), 1, 1)]
        pos = 0
        for ids, is_loss, turn in pieces:
            tokens[i, pos : pos + len(ids)] = ids
            loss[i, pos : pos + len(ids)] = is_loss
            turns[i, pos : pos + len(ids)] = turn
            pos += len(ids)
        mask[i, :pos] = 1
    return rl.TrainBatch(tokens=tokens, attention_mask=mask, loss_mask=loss, turn_ids=turns)


def with_rl_fields(batch: rl.TrainBatch, logp_bt: np.ndarray, seed: int) -> rl.TrainBatch:
    rng = np.random.default_rng(seed)
    m = np.asarray(batch.loss_mask)
    return batch.replace(
        advantages=(rng.normal(size=m.shape) * m).astype(np.float32),
        old_logprobs=((np.asarray(logp_bt) + 0.1 * rng.normal(size=m.shape)) * m).astype(np.float32),
    )


# ---------------------------------------------------------------------------- the plan
def test_plan_groups_rows_per_chunk_and_buckets_shapes():
    batch = make_rows(0)
    plan = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 2)
    assert plan is not None
    # chunk 0: prompts 50, 50, 50, 44 -> 2 prefixes; chunk 1: 61, 61, 40, none -> 2 (U = 2, a power of 2)
    np.testing.assert_array_equal(plan.row_prefix, [0, 0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(plan.prefix_len, [49, 49, 49, 43, 60, 60, 39, 0])
    assert plan.shape == (4, 64, 24) and not plan.nested  # (chunks × U, P multiple of 64, S multiple of 8)
    b = np.asarray(batch.tokens)
    for i in range(8):
        c, p = i // 4, plan.prefix_len[i]
        np.testing.assert_array_equal(plan.prefix_tokens[c * 2 + plan.row_prefix[i], :p], b[i, :p])
        n = int(batch.attention_mask[i].sum()) - p
        np.testing.assert_array_equal(plan.suffix_tokens[i, : min(n, 24)], b[i, p : p + min(n, 24)])
    assert plan.prefix_mask.sum(1).tolist() == [49, 43, 60, 39]


@pytest.mark.parametrize("plen,expect_p", [(65, 64), (66, 128)])
def test_prefix_bucket_boundary(plen, expect_p):
    batch = make_rows(1, layout=((plen, plen, plen, plen),))
    plan = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 1, min_saving=-1.0)
    assert plan.shape[1] == expect_p and plan.prefix_len[0] == plen - 1


def test_three_prefixes_bucket_to_four_and_suffix_to_a_multiple_of_8():
    batch = make_rows(2, layout=((20, 20, 30, 40, 40, 50),))
    plan = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 1, min_saving=-1.0)
    assert plan.shape[0] == 4
    b = make_rows(3, layout=((20, 20),))
    b = b.replace(loss_mask=np.asarray(b.attention_mask, np.float32) * (np.arange(T) >= 20))  # loss from 20 ...
    b = b.replace(attention_mask=np.asarray(b.attention_mask) | (np.arange(T) < 60))  # ... to 59: 41 suffix tokens
    plan = rl.plan_prefix(b.tokens, b.attention_mask, b.loss_mask, 1, min_saving=-1.0)
    assert plan.shape[2] == 48


def test_plan_falls_back_when_sharing_saves_nothing():
    distinct = make_rows(4, layout=((90, 91, 92, 93),))  # U·P + B·S = 4·128 + 4·32 > 0.9 · B·T
    assert rl.plan_prefix(distinct.tokens, distinct.attention_mask, distinct.loss_mask, 1) is None
    shared = make_rows(4, layout=((40, 40, 40, 40),))
    assert rl.plan_prefix(shared.tokens, shared.attention_mask, shared.loss_mask, 1) is not None
    left_padded = shared.replace(attention_mask=np.roll(shared.attention_mask, 3, axis=1))
    assert rl.plan_prefix(left_padded.tokens, left_padded.attention_mask, shared.loss_mask, 1) is None
    no_loss = shared.replace(loss_mask=np.zeros_like(shared.loss_mask))
    assert rl.plan_prefix(no_loss.tokens, no_loss.attention_mask, no_loss.loss_mask, 1) is None


def test_nested_plan_runs_each_common_part_once():
    """Prompts that begin alike (a question before different plans) nest: each group's common part is
    an outer prefix, each prompt's rest an inner prefix after it; together they rebuild every row's
    prompt, and the plan computes fewer positions than the flat one."""
    batch = make_rows(13, **NESTED)
    plan = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 2)
    flat = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 2, nest=False, min_saving=-1.0)
    assert plan.nested and not flat.nested
    g, r, u, p, s = plan.buckets(2)
    assert (g, u) == (2, 4) and r % 32 == 0 and p % 8 == 0 and s % 8 == 0  # chunk 1 has 2 groups
    assert 2 * (g * r + u * p) < flat.shape[0] * flat.shape[1]
    b = np.asarray(batch.tokens)
    for i in range(8):
        c, n_i = i // 4, int(plan.prefix_len[i])
        if n_i == 0:
            continue
        pu = c * u + int(plan.row_prefix[i])
        go = c * g + int(plan.prefix_outer[pu])
        k = int(plan.outer_len[go])
        rebuilt = np.concatenate([plan.outer_tokens[go, :k], plan.prefix_tokens[pu, : n_i - k]])
        np.testing.assert_array_equal(rebuilt, b[i, :n_i])
        assert plan.prefix_mask[pu].sum() == n_i - k
    # the stems' groups share at least the stem; rows 0-2 (one stem) share one outer prefix
    assert plan.outer_len[plan.prefix_outer[plan.row_prefix[0]]] >= STEM
    assert len({int(plan.prefix_outer[plan.row_prefix[i]]) for i in range(3)}) == 1


def test_nested_buckets_keep_their_structure():
    """``min_buckets`` of a nested plan keeps a later batch nested (one compiled program), even one
    with a single prompt per chunk, at no smaller buckets; a flat plan's keeps it flat."""
    nested = rl.plan_prefix(*_fields(make_rows(13, **NESTED)), 2)
    single = make_rows(14, layout=((50, 50, 50, 50), (40, 40, 40, 40)))
    assert not rl.plan_prefix(*_fields(single), 2).nested  # alone it would not nest (one prompt per chunk)
    again = rl.plan_prefix(*_fields(single), 2, min_buckets=nested.buckets(2))
    assert again.nested and again.buckets(2) == nested.buckets(2)
    flat = rl.plan_prefix(*_fields(make_rows(13, **NESTED)), 2, min_buckets=(1, 64, 8), min_saving=-1.0)
    assert not flat.nested
    with pytest.raises(ValueError, match="min_buckets"):
        rl.plan_prefix(*_fields(single), 2, min_buckets=(1, 64, 8), nest=True)


def _fields(batch):
    return batch.tokens, batch.attention_mask, batch.loss_mask


# ---------------------------------------------------------------------------- the passes
MODEL = tiny_config()


def train_config(kind: str):
    return load_train_config(
        {
            "model": {"source": "smollm2-135m", "max_cache_len": 256},
            "adapter": {"kind": kind, "rank": 4, "alpha": 8.0},
            "rollout": {
                "mode": "multi_turn",
                "num_samples": 2,
                "max_turns": 2,
                "max_new_tokens": 24,
                "max_prompt_len": 100,
            },
            "reward": {"kind": "multi_turn"},
            "loss": {"max_turns": 2},
            "update": {"num_mini_batches": 1, "num_micro_batches": 2},
            "schedule": {"kind": "simultaneous"},
            "loop": {"max_seq_len": T + 128, "questions_per_step": 2},
        }
    )


_LEARNERS: dict = {}


def new_learner(kind: str, model=MODEL) -> Learner:
    cfg = train_config(kind)
    layout = AgentLayout.from_train_config(cfg)
    base = random_params(model, jax.random.key(0))
    trainable = layout.init_trainable(model, base, cfg.adapter, jax.random.key(1))
    if kind == "lora":  # B = 0 at init: make the adapters matter
        trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    return Learner(cfg, layout, model, trainable, layout.constants(base, trainable, False))


def learner_for(kind: str) -> Learner:
    """One learner per agent kind for the module (its jitted passes are reused across tests)."""
    if kind not in _LEARNERS:
        _LEARNERS[kind] = new_learner(kind)
    return _LEARNERS[kind]


def loss_and_grads_fn(learner: Learner, role: str = ROLE):
    """Jitted ``(trainable, batch) -> ((loss, logp_bt), grads)`` of ``role``'s PPO loss, through the
    learner's own log-prob function."""
    lp_fn = learner._sparse_logprobs(learner.layout.policy_view)
    agent = learner.layout.agent_of(role)

    def loss(trainable, batch):
        params = {**learner.params, agent: trainable}
        logp, ent = lp_fn(params, role, batch)
        value, _ = rl.ppo_loss(
            logp,
            batch.old_logprobs,
            batch.advantages,
            batch.loss_mask,
            batch.turn_ids,
            learner.config.loss,
            entropy_bt=ent,
        )
        return value, logp

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_logits_in_chunks_give_the_same_loss_and_grads(kind="lora"):
    """``ModelConfig.logits_chunk`` (the learner's log-prob passes project the loss positions a chunk
    at a time, recomputed in the backward pass): the same log-probs, loss and gradients as one block,
    on plain rows and with shared prefixes (the head weight's own gradient, for full agents, is
    tests/test_rl_losses.py's)."""
    batch = make_rows(5)
    rng = np.random.default_rng(7)
    batch = with_rl_fields(batch, -rng.uniform(1, 5, batch.shape) * batch.loss_mask, seed=7)
    one_block, chunked = learner_for(kind), new_learner(kind, MODEL.replace(logits_chunk=5))
    assert chunked.max_loss_tokens > 5
    trainable = one_block.state.params[one_block.layout.agent_of(ROLE)]
    for rows in (batch, one_block.with_prefix(batch, 1)):
        (loss_a, logp_a), grads_a = loss_and_grads_fn(one_block)(trainable, rows)
        (loss_b, logp_b), grads_b = loss_and_grads_fn(chunked)(trainable, rows)
        np.testing.assert_allclose(float(loss_b), float(loss_a), atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.asarray(logp_b), np.asarray(logp_a), atol=TOL, rtol=0)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
        for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), atol=TOL * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("kind, remat", [("lora", True), ("full", False)])
def test_scanned_layers_give_the_same_loss_and_grads(kind, remat):
    """``ModelConfig.scan_layers`` (one ``lax.scan`` over the stacked layers): the same log-probs, loss
    and gradients as the unrolled layers, with and without remat (a LoRA agent on plain and
    shared-prefix rows; a full agent, whose stacked layer params are what it trains, on shared-prefix
    rows); and the decoder layer's traces do not grow with depth."""
    from rema_jax.models import transformer

    batch = make_rows(5)
    rng = np.random.default_rng(8)
    batch = with_rl_fields(batch, -rng.uniform(1, 5, batch.shape) * batch.loss_mask, seed=8)
    layers = 3  # enough to tell depth-proportional traces (3 or 6) from the scan's bounded 1-4
    unrolled = new_learner(kind, MODEL.replace(remat=remat, num_layers=layers))
    scanned = new_learner(kind, MODEL.replace(remat=remat, num_layers=layers, scan_layers=True))
    trainable = unrolled.state.params[unrolled.layout.agent_of(ROLE)]
    traces = []
    real_call = transformer.DecoderLayer.__call__

    def counting(self, *args, **kwargs):
        traces.append(1)
        return real_call(self, *args, **kwargs)

    cases = ((batch, 1),) if kind == "lora" else ()
    cases += ((unrolled.with_prefix(batch, 1), 2),)  # shared prefix: prefix + suffix
    if kind == "lora":  # nested: outer prefix + prefix + suffix
        nested = make_rows(5, **NESTED)
        nested = with_rl_fields(nested, -rng.uniform(1, 5, nested.shape) * nested.loss_mask, seed=9)
        plan = rl.plan_prefix(nested.tokens, nested.attention_mask, nested.loss_mask, 1)
        assert plan.nested
        cases += ((nested.replace(prefix=plan), 3),)
    for rows, uses in cases:
        results, traced = [], {}
        for learner in (unrolled, scanned):
            traces.clear()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(transformer.DecoderLayer, "__call__", counting)
                results.append(loss_and_grads_fn(learner)(trainable, rows))
            traced[learner is scanned] = len(traces) // uses
        # unrolled: every layer traced (twice with remat: its forward and its backward's recompute);
        # scanned: the layer's trace count does not grow with the layers (lax.scan re-traces its body
        # a bounded number of times under autodiff: 3-4 with remat, 1 without, whatever the depth)
        assert traced[False] == layers * (1 + remat) and traced[True] <= (4 if remat else 1), traced
        ((loss_a, logp_a), grads_a), ((loss_b, logp_b), grads_b) = results
        np.testing.assert_allclose(float(loss_b), float(loss_a), atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.asarray(logp_b), np.asarray(logp_a), atol=TOL, rtol=0)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
        assert scale > 0
        for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), atol=TOL * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("kind", ["lora", "full", "shared"])
@pytest.mark.parametrize("nested", [False, True])
def test_logprobs_loss_and_grads_match_the_plain_path(kind, nested):
    learner = learner_for(kind)
    batch = make_rows(5, **(NESTED if nested else {}))
    rng = np.random.default_rng(6)
    batch = with_rl_fields(batch, -rng.uniform(1, 5, batch.shape) * batch.loss_mask, seed=6)
    fn = loss_and_grads_fn(learner)
    trainable = learner.state.params[learner.layout.agent_of(ROLE)]
    (loss_a, logp_a), grads_a = fn(trainable, batch)
    learner._prefix_buckets.clear()  # a batch shape's first plan picks its structure: let these rows pick
    planned = learner.with_prefix(batch, 1)
    assert planned.prefix is not None and planned.prefix.nested == nested
    (loss_b, logp_b), grads_b = fn(trainable, planned)
    assert np.abs(np.asarray(logp_a)).sum() > 0
    np.testing.assert_allclose(float(loss_b), float(loss_a), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(logp_b), np.asarray(logp_a), atol=TOL, rtol=0)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
    assert scale > 0
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), atol=TOL * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("nested", [False, True])
def test_update_with_micro_batches_matches_and_compiles_once(nested):
    learner = learner_for("lora")
    learner._prefix_buckets.clear()  # a batch shape's first plan picks its structure: let these rows pick
    batch = make_rows(7, **(NESTED if nested else {}))
    shared_lp = learner.old_logprobs(ROLE, batch)  # plans its 2 micro-batches itself (update.share_prefix)
    plain_lp = np.asarray(learner.logprob_fn(learner.params, ROLE, batch))
    np.testing.assert_allclose(shared_lp, plain_lp, atol=TOL, rtol=0)
    batch = with_rl_fields(batch, plain_lp, seed=8)
    trained = (ROLE,)
    plain_state = jax.tree.map(jnp.copy, learner.state)
    _, plain = learner.update_fn(plain_state, {ROLE: batch.replace(prefix=None)}, trained, constants=learner.constants)
    plain = {k: float(v) for k, v in jax.device_get(plain).items()}
    before = learner.update_fn.jitted._cache_size()
    shared = learner.update({ROLE: batch}, trained)  # plans 2 micro-batches itself
    for k in ("loss", "grad_norm", f"{ROLE}/pg_loss", f"{ROLE}/ratio_mean"):
        np.testing.assert_allclose(shared[k], plain[k], atol=TOL, rtol=TOL, err_msg=k)
    assert learner.update_fn.jitted._cache_size() == before + 1

    # a second step: other tokens, other group sizes, the same buckets -> no new compilation
    if nested:
        other = make_rows(9, layout=((95, 95, 70, 70), (85, 85, 85, 85)), stems=((0, 0, 0, 0), (1, 1, 1, 1)))
    else:
        other = make_rows(9, layout=((55, 55, 30, 30), (45, 45, 45, 45)))
    assert learner.with_prefix(batch, 2).prefix.nested == nested
    assert learner.with_prefix(other, 2).prefix.shape == learner.with_prefix(batch, 2).prefix.shape
    other = with_rl_fields(other, learner.old_logprobs(ROLE, other), seed=10)
    learner.update({ROLE: other}, trained)
    assert learner.update_fn.jitted._cache_size() == before + 1


def test_buckets_start_at_the_config_maxima_and_never_shrink():
    learner = new_learner("lora")  # its own bucket record (nothing compiles here); max_new_tokens 24
    assert learner.suffix_floor(T) == 32  # S: the answer's 24 tokens + 2, a multiple of 8
    assert learner.suffix_floor(16) == 16  # capped by the rows' length
    two = make_rows(11, layout=((50,) * 4 + (44,) * 4,))  # 8 rows in one chunk (a key of its own), 2 prompts
    assert learner.with_prefix(two, 1).prefix.shape == (2, 64, 32)
    four = make_rows(12, layout=((30, 30, 40, 40, 70, 70, 60, 60),))  # 4 prompts, one of 70: U, P grow ...
    assert rl.plan_prefix(four.tokens, four.attention_mask, four.loss_mask, 1).shape == (4, 128, 24)
    assert learner.with_prefix(four, 1).prefix.shape == (4, 128, 32)
    assert learner.with_prefix(two, 1).prefix.shape == (4, 128, 32)  # ... and stay: one compilation


# ---------------------------------------------------------------------------- real model, real rows
@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_real_rollout_rows_match(smollm2_gguf, tmp_path):
    """SmolLM2-135M, single-turn ReMA rollout rows of both roles: log-probs, loss and LoRA gradients."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import default
    from rema_jax.training.role_batches import build_role_batch
    from rema_jax.training.trainer import Trainer

    cfg = default.get_config().rl.to_dict()
    cfg["model"]["init_adapters_from"] = None
    cfg["rollout"]["max_new_tokens"] = 32
    cfg["loop"]["questions_per_step"] = 2
    cfg["memory"]["check"] = False
    cfg = load_train_config(cfg)
    trainer = Trainer(cfg, str(tmp_path))
    learner = trainer.learner
    tasks = trainer.iterator.next()
    exp = trainer.worker.collect(trainer.sampling_view(), tasks, 0, solutions_per_plan=cfg.loop.solutions_per_plan)
    for role in cfg.rollout.agent_roles:
        rb = build_role_batch(
            exp, role, trainer.worker.encoder, cfg.rollout, cfg.loop.solutions_per_plan, cfg.loop.max_seq_len, 10_000
        )
        batch = rb.train
        planned = learner.with_prefix(batch, 2).prefix
        # the reasoning agent's prompts (a question, then one of its plans) nest under the question
        assert planned is not None and planned.nested == (role == "reasoning"), (role, planned.shape)
        plain_lp = np.asarray(learner.logprob_fn(learner.params, role, batch))
        # 30 fp32 layers: the passes' different matmul shapes round differently, up to ~3e-5 on
        # log-probs of magnitude 2-7 (flat and nested alike): 1e-5 relative on top of 1e-5
        np.testing.assert_allclose(learner.old_logprobs(role, batch), plain_lp, atol=TOL, rtol=TOL)
        agent = learner.layout.agent_of(role)
        # perturb B so the LoRA gradients reach every factor
        learner.state = learner.state._replace(
            params={
                **learner.state.params,
                agent: jax.tree.map(lambda x: x + 1e-3 * jnp.ones_like(x), learner.state.params[agent]),
            }
        )
        batch = with_rl_fields(batch, plain_lp, seed=12)
        fn = loss_and_grads_fn(learner, role)
        (la, _), ga = fn(learner.state.params[agent], batch)
        one_chunk = learner.with_prefix(batch, 1)  # both questions: every prompt shares the system prompt
        assert one_chunk.prefix is not None and one_chunk.prefix.nested
        (lb, _), gb = fn(learner.state.params[agent], one_chunk)
        np.testing.assert_allclose(float(lb), float(la), atol=TOL, rtol=TOL)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ga))
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=TOL * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("policy", ["full", "save_mlp"])
def test_remat_recomputes_each_layer_with_the_same_values(policy):
    """``ModelConfig.remat`` applies to the shared-prefix forward as to ``forward``: each layer call is a
    ``tied_remat`` custom VJP (its activations are recomputed in the backward pass), values unchanged."""
    batch = make_rows(5)
    plan = rl.plan_prefix(batch.tokens, batch.attention_mask, batch.loss_mask, 1)
    base = random_params(MODEL, jax.random.key(0))

    def loss(params, config):
        return jnp.sum(models.forward_shared_prefix(config, params, plan) ** 2) * 1e-3

    grads = {}
    for remat in (False, True):
        config = MODEL.replace(remat=remat, remat_policy=policy)
        jaxpr = str(jax.make_jaxpr(loss, static_argnums=1)(base, config))
        assert jaxpr.count("custom_vjp_call") == (2 * MODEL.num_layers if remat else 0)  # prefix + suffix
        grads[remat] = jax.jit(jax.grad(loss), static_argnums=1)(base, config)
    for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
