"""Sharding machinery on one process: mesh config, rules → specs, fallbacks, memory plan, multi-host helpers.

The multi-device equivalence checks (8 simulated devices) live in tests/test_sharding_mesh8.py.
"""

import logging
import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rema_jax.models import layers, param_shapes
from rema_jax.models.adapters import AdapterConfig, init_adapter
from rema_jax.models.testing import random_params, tiny_config
from rema_jax.sharding import (
    DEFAULT_RULES,
    DistributedConfigError,
    MemoryPlanError,
    MeshConfig,
    MeshConfigError,
    ShardingPlan,
    ShardingRulesError,
    check_fits,
    device_memory_bytes,
    global_batch_from_host,
    host_rows,
    is_main_process,
    make_mesh,
    maybe_initialize,
    multiprocess_env,
    plan_memory,
    reduce_metrics,
    shard_shape,
    unknown_leaves,
    validate_rules,
)
from rema_jax.sharding.memory import KV_CACHE_AXES

CFG = tiny_config()  # hidden 32, ffn 64, vocab 128, 4 heads / 2 kv heads x 8, 2 layers
SIZES = {"data": 1, "fsdp": 2, "tensor": 4}


# ------------------------------------------------------------------ mesh
def test_mesh_config_fills_and_validates():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshConfig(data=2, fsdp=-1, tensor=1).resolve(8)["fsdp"] == 4
    with pytest.raises(MeshConfigError, match="8 devices are available"):
        MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    with pytest.raises(MeshConfigError, match="does not divide"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(MeshConfigError, match="only one axis"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(MeshConfigError, match="positive ints"):
        MeshConfig(tensor=0)
    with pytest.raises(MeshConfigError, match="unknown axes"):
        MeshConfig.from_mapping({"data": 1, "model": 2})


def test_make_mesh_on_this_process_devices():
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert math.prod(mesh.devices.shape) == jax.device_count()
    with pytest.raises(MeshConfigError, match="jax.device_count"):
        make_mesh(MeshConfig(data=jax.device_count() + 1))


# ------------------------------------------------------------------ rules
def test_param_specs_follow_the_rules():
    plan = ShardingPlan(SIZES, CFG)
    specs = plan.tree_specs(param_shapes_arrays())
    layer = specs["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["input_layernorm"]["scale"] == P()
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    # 2 kv heads cannot split 4 ways: the kv dim is replicated, the hidden dim still fsdp-sharded
    assert layer["self_attn"]["k_proj"]["kernel"] == P("fsdp")


def param_shapes_arrays(config=CFG):
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32), param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)
    )


def test_indivisible_heads_fall_back_with_a_warning(caplog):
    cfg = tiny_config(num_heads=9, num_kv_heads=3, head_dim=4, hidden_size=36)  # 9 heads x 4 = 36 % 4 == 0
    plan = ShardingPlan(SIZES, cfg)
    with caplog.at_level(logging.WARNING, logger="rema_jax.sharding.rules"):
        spec = plan.leaf_spec(("layers_0", "self_attn", "q_proj", "kernel"), (36, 36))
    # 36 columns would divide by 4, but a shard would split a head: not sharded over tensor
    assert spec == P("fsdp")
    assert shard_shape((36, 36), spec, SIZES) == (18, 36)
    assert any("q_heads" in r.getMessage() and "9 units" in r.getMessage() for r in caplog.records)


def test_batch_falls_back_to_the_axes_that_divide():
    plan = ShardingPlan({"data": 2, "fsdp": 4, "tensor": 1}, CFG)
    assert plan.batch_spec((8, 16)) == P(("data", "fsdp"))
    assert plan.batch_spec((6, 16)) == P("data")
    assert plan.batch_spec((3, 16)) == P()


def test_adapter_and_optimizer_state_mirror_param_specs():
    params = random_params(CFG, jax.random.key(0))
    adapter = init_adapter(CFG, params, AdapterConfig(rank=4), jax.random.key(1))
    plan = ShardingPlan(SIZES, CFG)
    a_specs = plan.tree_specs(adapter)
    q = a_specs.weights["layers_1"]["self_attn"]["q_proj"]
    assert q["lora_a"] == P("fsdp") and q["lora_b"] == P(None, "tensor")
    state = optax.adamw(1e-3).init({"reasoning": adapter})
    s_specs = plan.tree_specs(state)
    mu = s_specs[0].mu["reasoning"].weights["layers_1"]["self_attn"]["q_proj"]
    assert mu == q
    assert s_specs[0].count == P()
    assert unknown_leaves(state) == []


def test_cache_specs_and_unknown_leaves():
    plan = ShardingPlan({"data": 2, "fsdp": 1, "tensor": 2}, CFG)
    shapes = layers.kv_cache_shapes(CFG, 4, 16)  # the sampler's cache: k [B, kv, hd, C], v [B, kv, C, hd]
    specs = plan.cache_specs((layers.KVCache(np.zeros(shapes.k), np.zeros(shapes.v)),))[0]
    assert specs == layers.KVCache(P("data", "tensor"), P("data", "tensor"))
    for axes, shape, spec in zip(KV_CACHE_AXES, shapes, specs):
        assert plan.spec(axes, shape, "kv_cache") == spec  # the memory plan's axes
    with pytest.raises(ShardingRulesError, match="Contract 2"):
        plan.cache_specs(({"k": np.zeros((4, 16)), "v": np.zeros((4, 16))},))
    odd = {"mystery": np.zeros((3, 5))}
    assert unknown_leaves(odd) == ["mystery"]
    assert plan.tree_specs(odd)["mystery"] == P()
    with pytest.raises(ShardingRulesError, match="not a known parameter kind"):
        ShardingPlan(SIZES, CFG, strict=True).tree_specs(odd)


def test_rules_are_validated():
    assert validate_rules(DEFAULT_RULES)["embed"] == ("fsdp",)
    with pytest.raises(ShardingRulesError, match="unknown mesh axes"):
        validate_rules((("embed", "model"),))
    with pytest.raises(ShardingRulesError, match="twice"):
        validate_rules((("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ShardingRulesError, match="no sharding rule"):
        ShardingPlan(SIZES, CFG, rules=(("embed", "fsdp"),)).leaf_spec(("lm_head", "kernel"), (32, 128))


def test_plan_put_on_one_device_keeps_values():
    params = random_params(CFG, jax.random.key(0))
    plan = ShardingPlan(make_mesh(MeshConfig()), CFG)
    placed = plan.put(jax.device_get(params))
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ memory
def test_memory_plan_params_are_exact_per_device():
    params = random_params(CFG, jax.random.key(0))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    one = plan_memory(CFG, {"data": 1, "fsdp": 1, "tensor": 1})
    assert one.rows["params (base)"] == total
    plan = ShardingPlan(SIZES, CFG)
    expected = sum(
        math.prod(shard_shape(x.shape, s, SIZES)) * 4
        for x, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(plan.tree_specs(params), is_leaf=lambda v: isinstance(v, P))
        )
    )
    sharded = plan_memory(CFG, SIZES)
    assert sharded.rows["params (base)"] == expected < total
    # LoRA: 2 agents x (A [in, r] + B [r, out]) x 7 targets x 2 layers, fp32, unsharded on one device
    r = 8
    per_layer = sum((i + o) * r for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert one.rows["adapters"] == 2 * 2 * per_layer * 4
    assert one.rows["optimizer state"] == 2 * one.rows["adapters"]
    full = plan_memory(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, adapter_kind="full")
    assert full.rows["adapters"] == 2 * total and full.rows["optimizer state"] == 4 * total
    # the KL reference copy: none unless asked; the warm-start adapters, or the whole shared model
    assert one.rows["reference copy (KL)"] == 0
    with_ref = plan_memory(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, reference_copy=True)
    assert with_ref.rows["reference copy (KL)"] == one.rows["adapters"]
    assert with_ref.update_bytes - one.update_bytes == one.rows["adapters"]
    shared = plan_memory(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, adapter_kind="shared", reference_copy=True)
    assert shared.rows["reference copy (KL)"] == total
    # KV cache: 2 (k, v) x layers x B x kv_heads x len x head_dim x 4 bytes, split over data x tensor
    kv = plan_memory(CFG, {"data": 2, "fsdp": 1, "tensor": 2}, rollout_batch=8, cache_len=32).rows["kv cache"]
    assert kv == 2 * 2 * (8 // 2) * (2 // 2) * 32 * 8 * 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_plan_kv_cache_is_what_the_sampler_allocates(dtype):
    """The plan's "kv cache" row equals the bytes of the caches the sampler's prefill returns."""
    from rema_jax.sampling import kernel

    cfg = CFG.replace(dtype=dtype)
    params = random_params(cfg, jax.random.key(0))
    b, p, cache_len = 4, 8, 24
    caches, _ = jax.jit(lambda f, t, pad: kernel.prefill(cfg, f, t, pad, cache_len))(
        kernel.fuse_params(cfg, params, None), np.full((b, p), 5, np.int32), np.zeros((b,), np.int32)
    )
    allocated = sum(x.nbytes for x in jax.tree.leaves(caches))
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    assert plan_memory(cfg, one, rollout_batch=b, cache_len=cache_len).rows["kv cache"] == allocated


def test_check_fits_refuses_with_the_breakdown():
    plan = plan_memory(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, train_batch=4, train_seq=64)
    check_fits(plan, 10 * plan.peak_bytes)
    check_fits(plan, None)  # unknown device memory: nothing to check
    with pytest.raises(MemoryPlanError) as e:
        check_fits(plan, plan.peak_bytes // 2)
    msg = str(e.value)
    for row in ("params (base)", "adapters", "optimizer state", "kv cache", "activations (estimate)", "peak"):
        assert row in msg
    with pytest.raises(ValueError, match="adapter_kind"):
        plan_memory(CFG, SIZES, adapter_kind="qlora")


def test_device_memory_falls_back_to_the_configured_value():
    got = device_memory_bytes(default=123)
    stats = jax.local_devices()[0].memory_stats()
    assert got == (stats["bytes_limit"] if stats and stats.get("bytes_limit") else 123)


# ------------------------------------------------------------------ multi-host helpers
def test_multiprocess_env_parsing():
    assert multiprocess_env({}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert multiprocess_env(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert multiprocess_env(dict(env, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")) is None
    with pytest.raises(DistributedConfigError, match="JAX_PROCESS_ID"):
        multiprocess_env({k: v for k, v in env.items() if k != "JAX_PROCESS_ID"})
    with pytest.raises(DistributedConfigError, match="must be in"):
        multiprocess_env(dict(env, JAX_PROCESS_ID="4"))
    with pytest.raises(DistributedConfigError, match="integer"):
        multiprocess_env(dict(env, JAX_NUM_PROCESSES="four"))
    assert multiprocess_env({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    assert multiprocess_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert maybe_initialize({}) is False


def test_host_rows_and_single_process_helpers():
    assert host_rows(16, 1, 4) == slice(4, 8)
    assert host_rows(16) == slice(0, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        host_rows(10, 0, 4)
    assert is_main_process()
    assert reduce_metrics({"a": 1.0, "b": np.float32(3.0)}) == {"a": 1.0, "b": 3.0}
    with pytest.raises(ValueError, match="op="):
        reduce_metrics({"a": 1.0}, op="median")
    plan = ShardingPlan(make_mesh(MeshConfig()), CFG)
    batch = {"tokens": np.arange(16, dtype=np.int32).reshape(4, 4)}
    out = global_batch_from_host(batch, plan.batch_shardings(batch))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
