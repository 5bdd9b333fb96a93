"""Sharded == single-device, on 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`).

The device count is fixed when JAX initialises, so the checks run in a subprocess (`_worker`, this
file executed as a script) that prints one JSON record per mesh; the pytest tests assert on it.
Per mesh (data, fsdp, tensor) in (8,1,1), (2,4,1), (1,2,4):
- one RL update step (`rema_jax.rl.make_update_fn`, turn-level PPO + AdamW) for two LoRA agents and
  for a shared full-fine-tuning tree, jitted with explicit in/out shardings, vs the same step on one
  device: max |Δ| of every new parameter and optimizer-state leaf, and of the loss;
- greedy decoding: the sampler kernel's prefill + decode steps jitted with explicit shardings (the KV
  cache constrained to the memory plan's axes: split over the batch and kv heads) and the `Sampler` on
  sharded params, vs one device: the tokens;
- the per-device shard shapes of params, adapters, optimizer moments, cache and batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import codegen  # tests/codegen.py: the session's XLA code generation
import pytest

MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4)]
TOL = 1e-6


def _worker() -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rema_jax.models import forward, layers
    from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter
    from rema_jax.models.testing import random_params, tiny_config
    from rema_jax.rl import LossConfig, MultiAgentOptimizer, OptimizerConfig, init_rl_state, make_update_fn
    from rema_jax.sampling import Sampler, SamplingParams, kernel
    from rema_jax.sharding import MeshConfig, ShardingPlan, make_mesh, shard_update_fn
    from rema_jax.sharding.memory import KV_CACHE_AXES

    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config(num_kv_heads=4, num_layers=1)  # 4 q/kv heads: tensor=4 really splits attention
    base = random_params(cfg, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 4)

    def lora(k1, k2):  # non-zero B so both factors get gradients
        a = init_adapter(cfg, base, AdapterConfig(rank=4, alpha=8.0), k1)
        w = jax.tree.map(lambda x: x, a.weights)
        leaves, tdef = jax.tree.flatten(w)
        ks = jax.random.split(k2, len(leaves))
        leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, ks)]
        return Adapter(jax.tree.unflatten(tdef, leaves), kind="lora", scale=a.scale)

    agents = {"meta_thinking": lora(keys[0], keys[1]), "reasoning": lora(keys[2], keys[3])}
    n, L = 8, 16
    rng = np.random.default_rng(0)

    def role_batch():
        tokens = rng.integers(3, cfg.vocab_size, (n, L)).astype(np.int32)
        lengths = rng.integers(10, L + 1, n)
        attn = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
        loss = ((np.arange(L)[None] >= 4) & (attn > 0)).astype(np.float32)
        return {
            "tokens": tokens,
            "attention_mask": attn,
            "loss_mask": loss,
            "turn_ids": np.where(loss > 0, (np.arange(L)[None] >= 10).astype(np.int32), -1).astype(np.int32),
            "advantages": (rng.standard_normal((n, L)) * loss).astype(np.float32),
            "old_logprobs": (-5.0 + 0.3 * rng.standard_normal((n, L)) * loss).astype(np.float32),
        }

    batches = {"meta_thinking": role_batch(), "reasoning": role_batch()}
    loss_cfg = LossConfig(max_turns=2)
    # eps 1e-4: AdamW's first step is ~lr*sign(g), so with a tiny eps a gradient of ~1e-9 turns fp32
    # summation-order noise into lr-sized parameter differences; eps bounds d(param)/d(g) by lr/eps = 10.
    opt = MultiAgentOptimizer(OptimizerConfig(learning_rate=1e-3, eps=1e-4))

    def lora_logits(p, role, b):  # the frozen base comes in as the constant "base"
        return forward(cfg, p["base"], b.tokens, p[role], attention_mask=b.attention_mask)

    def shared_logits(p, role, b):
        return forward(cfg, p["shared"], b.tokens, attention_mask=b.attention_mask)

    setups = {
        "lora": (
            make_update_fn(lora_logits, loss_cfg, opt),
            init_rl_state(agents, opt),
            ("reasoning",),
            {"base": base},
        ),
        "full": (make_update_fn(shared_logits, loss_cfg, opt), init_rl_state({"shared": base}, opt), ("shared",), {}),
    }
    ref_updates = {}
    for name, (fn, state, trained, consts) in setups.items():
        ref_updates[name] = jax.device_get(fn(state, batches, trained, consts))

    prompts = rng.integers(3, cfg.vocab_size, (n, 8)).astype(np.int32)
    steps = 8

    def make_greedy(cache_sharding=None):
        def greedy(params, adapter, prompt_bt):  # the sampler kernel's prefill + decode steps, greedy
            b, t = prompt_bt.shape
            fp = kernel.fuse_params(cfg, params, adapter)
            pad_b = jnp.zeros((b,), jnp.int32)
            caches, logits = kernel.prefill(cfg, fp, prompt_bt, pad_b, t + steps)
            if cache_sharding is not None:
                caches = jax.lax.with_sharding_constraint(caches, cache_sharding)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(tok)

            def body(i, carry):
                tok, out, caches = carry
                slot = t + i - 1
                caches, logits = kernel.decode_step(cfg, fp, caches, tok, jnp.full((b,), slot, jnp.int32), slot, pad_b)
                tok = jnp.argmax(logits, -1).astype(jnp.int32)
                return tok, out.at[:, i].set(tok), caches

            return jax.lax.fori_loop(1, steps, body, (tok, out, caches))[1]

        return greedy

    adapter = agents["reasoning"]
    ref_greedy = np.asarray(jax.jit(make_greedy())(base, adapter, prompts))

    class Tok:  # the Sampler needs only decode() and an EOS id here
        eos_token_id = 2

        def decode(self, ids):
            return " ".join(map(str, ids))

    greedy_sampling = SamplingParams(max_new_tokens=10, greedy=True, ignore_eos=True)
    prompt_rows = [list(map(int, r[: 3 + i])) for i, r in enumerate(prompts)]
    ref_sampled = [
        g.token_ids for g in Sampler(cfg, Tok(), max_cache_len=64).generate(base, adapter, prompt_rows, greedy_sampling)
    ]

    def max_diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )

    def shard_shape(x):
        return list(x.addressable_shards[0].data.shape)

    for mesh_shape in MESHES:
        t0 = time.perf_counter()
        mesh = make_mesh(MeshConfig(*mesh_shape))
        plan = ShardingPlan(mesh, cfg)
        rec = {"mesh": list(mesh_shape)}
        for name, (fn, state, trained, consts) in setups.items():
            s_state, s_consts = plan.put(state), plan.put(consts)
            s_batches = jax.tree.map(lambda x, s: jax.device_put(x, s), batches, plan.batch_shardings(batches))
            step = shard_update_fn(fn, plan, s_state, s_batches, trained, s_consts)
            new_state, metrics = step(s_state, s_batches, s_consts)
            ref_state, ref_metrics = ref_updates[name]
            rec[f"{name}_param_diff"] = max_diff(new_state.params, ref_state.params)
            rec[f"{name}_opt_diff"] = max_diff(new_state.opt_state, ref_state.opt_state)
            rec[f"{name}_loss_diff"] = abs(float(metrics["loss"]) - float(ref_metrics["loss"]))
            rec[f"{name}_changed"] = max_diff(new_state.params, state.params)
            if name == "lora":
                w = new_state.params["reasoning"].weights["layers_0"]["self_attn"]["q_proj"]
                mu = new_state.opt_state["reasoning"][0].mu.weights["layers_0"]["self_attn"]["q_proj"]
                rec["lora_a_shard"], rec["lora_b_shard"] = shard_shape(w["lora_a"]), shard_shape(w["lora_b"])
                rec["lora_b_mu_shard"] = shard_shape(mu["lora_b"])
            else:
                p = new_state.params["shared"]
                rec["q_kernel_shard"] = shard_shape(p["layers_0"]["self_attn"]["q_proj"]["kernel"])
                rec["embed_shard"] = shard_shape(p["embed_tokens"]["embedding"])
                rec["down_mu_shard"] = shard_shape(
                    new_state.opt_state["shared"][0].mu["layers_0"]["mlp"]["down_proj"]["kernel"]
                )
                rec["tokens_shard"] = shard_shape(s_batches["reasoning"]["tokens"])

        s_base, s_adapter = plan.put(base), plan.put(adapter)
        cache_shapes = layers.kv_cache_shapes(cfg, n, 8 + steps)
        cache_sh = layers.KVCache(*(plan.activation_sharding(a, s) for a, s in zip(KV_CACHE_AXES, cache_shapes)))
        rec["cache_shard"] = [list(sh.shard_shape(s)) for sh, s in zip(cache_sh, cache_shapes)]
        tok_sh = plan.batch_shardings(prompts)
        # the cache inside `greedy` follows the memory plan's axes too: constrained where prefill creates it
        g = jax.jit(
            make_greedy((cache_sh,) * cfg.num_layers),
            in_shardings=(plan.tree_shardings(base), plan.tree_shardings(adapter), tok_sh),
            out_shardings=tok_sh,
        )
        sharded_tokens = g(s_base, s_adapter, jax.device_put(prompts, tok_sh))
        rec["greedy_equal"] = bool(np.array_equal(np.asarray(sharded_tokens), ref_greedy))
        rec["greedy_out_shard"] = shard_shape(sharded_tokens)
        sampled = [
            g.token_ids
            for g in Sampler(cfg, Tok(), max_cache_len=64).generate(s_base, s_adapter, prompt_rows, greedy_sampling)
        ]
        rec["sampler_equal"] = sampled == ref_sampled
        if mesh_shape == (1, 2, 4):  # sharded loading of a HF checkpoint dir straight into this layout
            import tempfile

            from rema_jax.models import export_hf
            from rema_jax.sharding import load_sharded

            with tempfile.TemporaryDirectory() as d:
                export_hf(d, cfg, base)
                loaded, _ = load_sharded(d, mesh, with_tokenizer=False)
            rec["loaded_diff"] = max_diff(loaded.params, base)
            q = loaded.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
            rec["loaded_q_shard"] = shard_shape(q)
            rec["loaded_q_spec"] = [str(a) for a in q.sharding.spec]
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        print("RESULT " + json.dumps(rec), flush=True)


@pytest.fixture(scope="module")
def mesh8_results():
    xla_flags = " ".join(["--xla_force_host_platform_device_count=8", *codegen.flags()])  # + the session's codegen
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode:
        pytest.fail(f"8-device worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    recs = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {tuple(r["mesh"]): r for r in recs}


@pytest.mark.parametrize("mesh", MESHES)
def test_update_step_matches_single_device(mesh8_results, mesh):
    r = mesh8_results[mesh]
    for name in ("lora", "full"):
        assert r[f"{name}_changed"] > 1e-5, f"{name}: the update did not change the params ({r})"
        assert r[f"{name}_param_diff"] < TOL, f"{name} params differ from 1 device on mesh {mesh}: {r}"
        assert r[f"{name}_opt_diff"] < TOL, f"{name} optimizer state differs on mesh {mesh}: {r}"
        assert r[f"{name}_loss_diff"] < TOL, f"{name} loss differs on mesh {mesh}: {r}"


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_tokens_match_single_device(mesh8_results, mesh):
    r = mesh8_results[mesh]
    assert r["greedy_equal"], f"prefill+decode greedy tokens differ on mesh {mesh}"
    assert r["sampler_equal"], f"Sampler greedy tokens differ on mesh {mesh}"


def test_params_are_really_sharded(mesh8_results):
    # tiny config: hidden 32, ffn 64, vocab 128, 4 heads x 8, LoRA rank 4; batch 8 rows x 16
    r = mesh8_results[(8, 1, 1)]  # pure data parallel: params replicated, batch split 8 ways
    assert r["q_kernel_shard"] == [32, 32] and r["embed_shard"] == [128, 32]
    assert r["tokens_shard"] == [1, 16] and r["cache_shard"] == [
        [1, 4, 8, 16],
        [1, 4, 16, 8],
    ]  # k [B, kv, hd, C], v [B, kv, C, hd]
    r = mesh8_results[(2, 4, 1)]  # fsdp=4 shards the hidden dim of every weight and its moments
    assert r["q_kernel_shard"] == [8, 32] and r["embed_shard"] == [128, 8] and r["down_mu_shard"] == [64, 8]
    assert r["lora_a_shard"] == [8, 4] and r["lora_b_shard"] == [4, 32] and r["lora_b_mu_shard"] == [4, 32]
    assert r["tokens_shard"] == [1, 16] and r["cache_shard"] == [[1, 4, 8, 16], [1, 4, 16, 8]]
    r = mesh8_results[(1, 2, 4)]  # fsdp=2 x tensor=4: heads/ffn/vocab split 4 ways
    assert r["q_kernel_shard"] == [16, 8] and r["embed_shard"] == [32, 16] and r["down_mu_shard"] == [16, 16]
    assert r["lora_a_shard"] == [16, 4] and r["lora_b_shard"] == [4, 8] and r["lora_b_mu_shard"] == [4, 8]
    assert r["tokens_shard"] == [4, 16] and r["cache_shard"] == [[4, 1, 8, 16], [4, 1, 16, 8]]
    assert r["greedy_out_shard"] == [4, 8]


def test_sharded_loading_places_each_tensor_in_its_layout(mesh8_results):
    r = mesh8_results[(1, 2, 4)]
    assert r["loaded_diff"] == 0.0
    assert r["loaded_q_shard"] == [16, 8] and r["loaded_q_spec"] == ["fsdp", "tensor"]


if __name__ == "__main__":
    _worker()
