"""Scale-out: device mesh, logical-axis sharding rules, sharded loading, memory planning, multi-host.

mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
model, plan = load_sharded("smollm2-135m", mesh)          # params born sharded
print(plan_memory(model.config, mesh, train_batch=8).table())
state = plan.put(init_rl_state(adapters, optimizer))       # adapters + AdamW moments sharded
step = shard_update_fn(update_fn, plan, state, batches, trained=("reasoning",))
"""

from rema_jax.sharding.distributed import (
    DistributedConfigError,
    global_batch_from_host,
    host_rows,
    is_main_process,
    maybe_initialize,
    multiprocess_env,
    reduce_metrics,
    sync,
)
from rema_jax.sharding.loading import load_sharded, make_placer
from rema_jax.sharding.memory import (
    MemoryPlan,
    MemoryPlanError,
    activation_bytes_per_token,
    check_fits,
    device_memory_bytes,
    plan_memory,
)
from rema_jax.sharding.mesh import MESH_AXES, MeshConfig, MeshConfigError, make_mesh, mesh_sizes
from rema_jax.sharding.rules import (
    CACHE_AXES,
    DEFAULT_RULES,
    KERNEL_AXES,
    KEY_CACHE_AXES,
    ShardingPlan,
    ShardingRulesError,
    describe,
    logical_to_spec,
    param_logical_axes,
    place,
    shard_shape,
    unknown_leaves,
    validate_rules,
)
from rema_jax.sharding.step import shard_logprobs_fn, shard_update_fn

__all__ = [
    "DistributedConfigError",
    "global_batch_from_host",
    "host_rows",
    "is_main_process",
    "maybe_initialize",
    "multiprocess_env",
    "reduce_metrics",
    "sync",
    "load_sharded",
    "make_placer",
    "MemoryPlan",
    "MemoryPlanError",
    "activation_bytes_per_token",
    "check_fits",
    "device_memory_bytes",
    "plan_memory",
    "MESH_AXES",
    "MeshConfig",
    "MeshConfigError",
    "make_mesh",
    "mesh_sizes",
    "CACHE_AXES",
    "KEY_CACHE_AXES",
    "DEFAULT_RULES",
    "KERNEL_AXES",
    "ShardingPlan",
    "ShardingRulesError",
    "describe",
    "logical_to_spec",
    "param_logical_axes",
    "place",
    "shard_shape",
    "unknown_leaves",
    "validate_rules",
    "shard_logprobs_fn",
    "shard_update_fn",
]
