"""The run's per-device memory plan, checked before anything is compiled."""

from __future__ import annotations

import jax

from rema_jax import sharding
from rema_jax.training.config import TrainConfig
from rema_jax.training.layout import AgentLayout


def check_memory(cfg: TrainConfig, layout: AgentLayout, model_config, sampler, mesh) -> sharding.MemoryPlan:
    """Plans per-device memory for this run's shapes, prints the table (main process) and refuses a run
    that cannot fit (``MemoryPlanError`` with the breakdown) before anything is compiled."""
    chunk = cfg.update.num_mini_batches * cfg.update.num_micro_batches
    rows = cfg.rows_per_step
    role_rows = [rows[r] for r in layout.roles]
    # one micro-batch holds every trained role's rows: all roles in shared mode, one otherwise
    train_rows = sum(role_rows) // chunk if layout.shared else max(role_rows) // chunk
    buckets = sampler.batch_buckets
    rollout_rows = next((b for b in buckets if b >= max(role_rows)), buckets[-1])
    plan = sharding.plan_memory(
        model_config,
        mesh if mesh is not None else {"data": 1, "fsdp": 1, "tensor": 1},
        adapter_kind=cfg.adapter.kind,
        lora_rank=cfg.adapter.rank,
        lora_targets=cfg.adapter.targets,
        num_agents=len(layout.roles),
        train_batch=train_rows,
        train_seq=cfg.loop.max_seq_len,
        rollout_batch=rollout_rows,
        cache_len=cfg.model.max_cache_len,
        reference_copy=layout.copies_reference(warm_started=bool(cfg.model.init_adapters_from)),
    )
    device_bytes = sharding.device_memory_bytes(default=cfg.memory.device_bytes)
    if sharding.is_main_process():
        print(plan.table(device_bytes), flush=True)
        if cfg.memory.check and device_bytes is None:
            print(
                f"memory check skipped: {jax.devices()[0].platform} reports no memory limit and "
                "memory.device_bytes is not set",
                flush=True,
            )
    if cfg.memory.check:
        sharding.check_fits(plan, device_bytes, headroom=cfg.memory.headroom)
    return plan
