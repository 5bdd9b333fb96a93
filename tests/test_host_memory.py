"""Host memory (issue 12 item 4): releasing the sampler's fused copies and the C heap, XLA:CPU's
memory scheduler, remat, and the memory plan's rows for what the main command holds. A few seconds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax import host_memory
from rema_jax.models import forward
from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter
from rema_jax.models.config import ModelConfigError
from rema_jax.models.layers import ATTENTION_PROJS, MLP_PROJS
from rema_jax.models.testing import chatml_bpe_tokenizer, random_params, tiny_config
from rema_jax.sampling import Sampler, SamplingParams
from rema_jax.sharding import plan_memory
from rema_jax.sharding.memory import REMAT_LIVE_FRACTION, activation_bytes_per_token

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def test_release_memory_collects_and_trims():
    assert host_memory.release_memory(clear_jax_caches=False) == host_memory.malloc_trim()
    x = jax.jit(lambda a: a + 1)(jnp.zeros(3))
    host_memory.release_memory()  # drops jit caches: the function still runs (compiles again)
    np.testing.assert_array_equal(jax.jit(lambda a: a + 1)(x), np.full(3, 2.0))


def test_release_memory_skips_the_gc_pass_when_asked(monkeypatch):
    import gc

    passes, trims = [], []
    monkeypatch.setattr(gc, "collect", lambda *a: passes.append(a) or 0)
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: trims.append(1) or True)
    host_memory.release_memory(clear_jax_caches=False, collect_garbage=False)  # the trainer's per-step calls
    assert passes == [] and trims == [1]
    host_memory.release_memory(clear_jax_caches=False)
    assert len(passes) == 1 and trims == [1, 1]


def test_use_memory_scheduler_sets_the_flag_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.delenv("REMA_JAX_CPU_SCHEDULER", raising=False)
    assert host_memory.use_memory_scheduler()
    flags = __import__("os").environ["XLA_FLAGS"]
    assert flags == f"--xla_foo=1 {host_memory.SCHEDULER_FLAG}"
    assert host_memory.use_memory_scheduler() and __import__("os").environ["XLA_FLAGS"] == flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert not host_memory.use_memory_scheduler()  # the user's setting wins
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("REMA_JAX_CPU_SCHEDULER", "concurrency")
    assert not host_memory.use_memory_scheduler() and __import__("os").environ["XLA_FLAGS"] == ""


def test_sampler_release_fused_drops_copies_and_keeps_executables():
    tok = chatml_bpe_tokenizer()
    cfg = tiny_config(vocab_size=len(tok))
    params = random_params(cfg, jax.random.key(0))
    sampler = Sampler(cfg, tok, max_cache_len=64, fused_cache_size=1)
    assert sampler.fused_cache_size == 1
    sp = SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True)
    first = sampler.generate(params, None, [[5, 6, 7]], sp)
    compiled = sampler.compile_count
    assert sampler.release_fused() == 1 and sampler.release_fused() == 0
    again = sampler.generate(params, None, [[5, 6, 7]], sp)
    assert sampler.compile_count == compiled  # re-fused with the same executable, nothing recompiled
    assert again[0].token_ids == first[0].token_ids


@pytest.mark.parametrize("policy", ["full", "save_mlp"])
def test_remat_gives_the_same_loss_and_gradients_within_fp32_rounding(policy):
    cfg = tiny_config(remat_policy=policy)
    params = random_params(cfg, jax.random.key(0))
    ad = init_adapter(cfg, params, AdapterConfig(kind="lora", rank=4, alpha=8.0), jax.random.key(1))
    weights = jax.tree.map(lambda x: x + 0.01, ad.weights)  # non-zero B: every factor gets a gradient
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)

    def loss(w, c):
        logits = forward(c, params, tokens, Adapter(weights=w, kind="lora", scale=ad.scale))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    v0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(weights, cfg)
    v1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(weights, cfg.replace(remat=True))
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)  # the same ops, fused differently by XLA
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("policy", ["full", "save_mlp"])
def test_remat_of_a_full_agent_gives_the_same_gradients(policy):
    cfg = tiny_config(remat_policy=policy)
    params = random_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(forward(c, p, tokens))[..., 3])

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))


def test_save_mlp_remat_policy_keeps_the_gate_and_up_products_instead_of_recomputing_them():
    """With ``remat_policy='save_mlp'`` the backward pass recomputes every layer but its MLP gate/up
    products (at least two matmuls fewer per layer than ``full``), and the memory plan counts what it keeps."""
    cfg = tiny_config(remat=True)
    params = random_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(forward(c, p, tokens))[..., 3])

    dots = {}
    for policy in ("full", "save_mlp"):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat_policy=policy)))
        dots[policy] = jaxpr.count("dot_general")
    # at least the two kept products per layer (the traced recompute may also drop values XLA would
    # remove as dead code, like the down projection's output, which no backward step reads)
    assert dots["full"] - dots["save_mlp"] >= 2 * cfg.num_layers, dots
    with pytest.raises(ModelConfigError, match="remat_policy"):
        cfg.replace(remat_policy="mlp")
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    full = activation_bytes_per_token(cfg, 12, sizes, remat=True)
    kept = activation_bytes_per_token(cfg.replace(remat_policy="save_mlp"), 12, sizes, remat=True)
    assert kept - full == cfg.num_layers * 2 * cfg.intermediate_size * 4
    assert activation_bytes_per_token(cfg.replace(remat_policy="save_mlp"), 12, sizes) == activation_bytes_per_token(
        cfg, 12, sizes
    )  # without remat every activation is kept anyway


def _sft_step_scratch_mib(num_layers: int, remat: bool) -> float:
    """XLA's scratch (``memory_analysis().temp_size_in_bytes``) of the real SFT step (loss, gradients
    and AdamW in one program), LoRA on every projection, SmolLM2's layer width, 4 x 128 rows."""
    from rema_jax import rl
    from rema_jax.sft.train import make_sft_step
    from rema_jax.training.layout import AgentLayout

    mc = tiny_config(
        num_layers=num_layers,
        hidden_size=576,
        intermediate_size=1536,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        vocab_size=512,
        remat=remat,
    )
    ac = AdapterConfig(kind="lora", rank=16, alpha=32.0, targets=ATTENTION_PROJS + MLP_PROJS)
    base = jax.eval_shape(lambda: random_params(mc, jax.random.key(0)))
    layout = AgentLayout.for_roles(("reasoning",), ac)
    params = jax.eval_shape(lambda b: layout.init_trainable(mc, b, ac, jax.random.key(0)), base)
    optimizer = rl.MultiAgentOptimizer(rl.OptimizerConfig(learning_rate=1e-3))
    state = jax.eval_shape(lambda p: rl.init_rl_state(p, optimizer), params)
    rows = {k: jax.ShapeDtypeStruct((4, 128), jnp.float32) for k in ("attention_mask", "loss_mask")}
    rows["tokens"] = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    step = make_sft_step(mc, optimizer, layout)
    lowered = step.lower(state.params, state.opt_state, base, rows, agent=layout.agent_of("reasoning"), k=32)
    return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20


def test_remat_keeps_about_one_layer_of_activations_live():
    """Each extra layer adds its activations to the scratch without remat, and little more than its
    input with it: `tied_remat` makes XLA:CPU form a layer's LoRA gradients before the backward pass
    moves on. (``nn.remat`` kept ~79% of the activations of this step: 27 of 34 MiB per layer.)"""
    per_layer = {r: (_sft_step_scratch_mib(4, r) - _sft_step_scratch_mib(2, r)) / 2 for r in (False, True)}
    assert per_layer[False] > 20  # the activations this test is about (4 x 128 rows, MLP 1536 wide)
    assert per_layer[True] < 0.25 * per_layer[False], per_layer


def test_memory_plan_counts_head_eval_batch_logits_remat_and_runtime():
    cfg = tiny_config(tie_word_embeddings=True)
    base = plan_memory(cfg, ONE, train_batch=4, train_seq=64, rollout_batch=8, cache_len=96, fused_copies=1)
    head = cfg.hidden_size * cfg.vocab_size * 4
    params_only = base.rows["params (base)"]
    assert base.rows["sampler fused weights"] == params_only + head  # the transposed tied LM head
    bf16 = plan_memory(cfg.replace(sampler_weight_dtype="bfloat16"), ONE, rollout_batch=8, cache_len=96, fused_copies=1)
    assert bf16.rows["sampler fused weights"] == (params_only + head) // 2
    assert base.rows["LM head copy (update)"] == head
    assert plan_memory(tiny_config(), ONE).rows["LM head copy (update)"] == 0  # untied: lm_head is a param
    # vocabulary logits only at the loss positions: fp32 logits, log-softmax and gradient
    sparse = plan_memory(cfg, ONE, train_batch=4, train_seq=64, loss_positions=10)
    assert sparse.rows["logits at loss positions"] == 4 * 10 * 3 * cfg.vocab_size * 4
    # in chunks: 10 positions in chunks of at most 4 -> 3 equal chunks of 4 (one position padded)
    chunked = plan_memory(cfg, ONE, train_batch=4, train_seq=64, loss_positions=10, logits_chunk=4)
    assert chunked.rows["logits at loss positions"] == 4 * 4 * 3 * cfg.vocab_size * 4
    wide = plan_memory(cfg, ONE, train_batch=4, train_seq=64, loss_positions=10, logits_chunk=16)
    assert wide.rows["logits at loss positions"] == sparse.rows["logits at loss positions"]
    # the eval's batch sizes the KV cache and prefill when larger than the rollout's
    ev = plan_memory(cfg, ONE, rollout_batch=8, eval_batch=48, cache_len=96)
    kv8 = plan_memory(cfg, ONE, rollout_batch=8, cache_len=96).rows["kv cache"]
    assert ev.rows["kv cache"] == 6 * kv8 and ev.rows["prefill (estimate)"] > 0
    # remat: the measured share of the activations XLA:CPU keeps live
    off = plan_memory(cfg, ONE, train_batch=4, train_seq=64)
    on = plan_memory(cfg, ONE, train_batch=4, train_seq=64, remat=True)
    frac = on.rows["activations (estimate)"] / off.rows["activations (estimate)"]
    assert abs(frac - REMAT_LIVE_FRACTION) < 1e-3
    # host runtime and compiled programs count in both phases
    extra = plan_memory(cfg, ONE, runtime_bytes=100, program_bytes=20)
    plain = plan_memory(cfg, ONE)
    assert extra.rollout_bytes - plain.rollout_bytes == 120 == extra.update_bytes - plain.update_bytes


@pytest.mark.parametrize("remat", [False, True])
def test_memory_plan_rows_sum_to_the_phases(remat):
    p = plan_memory(tiny_config(tie_word_embeddings=True), ONE, remat=remat, loss_positions=8, eval_batch=16)
    r = p.rows
    resident = sum(r[k] for k in ("params (base)", "adapters", "reference copy (KL)", "optimizer state"))
    resident += r["XLA runtime"] + r["compiled programs"]
    roll = ("sampler fused weights", "kv cache", "prefill (estimate)")
    upd = ("gradients", "LM head copy (update)", "activations (estimate)", "logits at loss positions")
    assert p.rollout_bytes == resident + sum(r[k] for k in roll)
    assert p.update_bytes == resident + sum(r[k] for k in upd)


def test_compiled_programs_counted_per_layer_and_per_live_role():
    """XLA:CPU programs grow with the unrolled layers; 'phase' keeps one alternating role's programs."""
    from rema_jax.training import memory_check
    from rema_jax.training.config import load_train_config
    from rema_jax.training.layout import AgentLayout
    from tests.test_trainer import tiny_train_config

    update, logprob, sampler = (
        memory_check.CPU_UPDATE_PROGRAM_BYTES_PER_LAYER[True],  # model.scan_layers (the default)
        memory_check.CPU_LOGPROB_PROGRAM_BYTES_PER_LAYER[True],
        memory_check.CPU_SAMPLER_PROGRAM_BYTES_PER_LAYER,
    )
    per_role = update  # one mini-batch: π_old comes from the update, no log-prob pass program
    for release, live in (("end", 2), ("phase", 1)):
        cfg = load_train_config(tiny_train_config(memory={"release_programs": release}))
        assert cfg.old_logprobs_in_update
        got = memory_check.program_bytes(cfg, AgentLayout.from_train_config(cfg), num_layers=30)
        assert got == 30 * (live * per_role + sampler), release
    recompute = load_train_config(
        tiny_train_config(update={"old_logprobs": "recompute"}, memory={"release_programs": "end"})
    )
    got = memory_check.program_bytes(recompute, AgentLayout.from_train_config(recompute), num_layers=30)
    assert got == 30 * (2 * (update + logprob) + sampler)
    unrolled = load_train_config(tiny_train_config(model={"scan_layers": False}, memory={"release_programs": "end"}))
    got = memory_check.program_bytes(unrolled, AgentLayout.from_train_config(unrolled), num_layers=30)
    assert got == 30 * (2 * memory_check.CPU_UPDATE_PROGRAM_BYTES_PER_LAYER[False] + sampler)
    shared = load_train_config(
        tiny_train_config(
            adapter={"kind": "shared"}, schedule={"kind": "simultaneous"}, memory={"release_programs": "phase"}
        )
    )
    assert memory_check.program_bytes(shared, AgentLayout.from_train_config(shared), 30) == 30 * (
        2 * per_role + sampler
    )
    kl = load_train_config(tiny_train_config(loss={"kl_coef": 0.01}))  # a π_ref pass per role
    assert AgentLayout.from_train_config(kl).needs_reference
    got = memory_check.program_bytes(kl, AgentLayout.from_train_config(kl), num_layers=30)
    assert got == 30 * (2 * (update + logprob) + sampler)


def test_a_long_compile_is_followed_by_a_heap_trim(monkeypatch):

    if not host_memory.trim_after_compiles():
        pytest.skip("no glibc malloc_trim here")
    monkeypatch.setattr(host_memory, "TRIM_MIN_COMPILE_S", 0.0)
    before = host_memory.trims_after_compiles()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()  # a new program
    assert host_memory.trims_after_compiles() > before
    monkeypatch.setattr(host_memory, "TRIM_MIN_COMPILE_S", 1e9)
    before = host_memory.trims_after_compiles()
    jax.jit(lambda x: jnp.cos(x) - 2.0)(jnp.arange(5.0)).block_until_ready()
    assert host_memory.trims_after_compiles() == before  # short compiles are left alone
