"""The run's per-device memory plan, checked before anything is compiled."""

from __future__ import annotations

import jax

from rema_jax import sharding
from rema_jax.sampling.bucketing import length_bucket
from rema_jax.training.config import TrainConfig
from rema_jax.training.layout import AgentLayout

# Host memory that is neither arrays nor XLA scratch, measured with the main command on CPU
# (2026-12-06, SmolLM2-135M; docs/architecture.md "Host memory of the main command"):
#  * the process with jax, the tokenizer and the loaded modules;
#  * the compiled programs XLA:CPU keeps: they grow with the decoder layers they unroll (kernels per
#    layer), not with the batch. One trained role's update program holds about
#    CPU_UPDATE_PROGRAM_BYTES_PER_LAYER and each of its log-prob passes (π_old unless the update computes
#    it, π_ref) about CPU_LOGPROB_PROGRAM_BYTES_PER_LAYER, keyed by ``model.scan_layers``: the RSS freed
#    by dropping each after an RA step of configs/default.py (30 layers, 2026-12-06: unrolled 564 and
#    79 MiB, together 22 MiB per layer where the main command's RSS had shown about 24; scanned 272 and
#    10 MiB, mostly the optimizer's per-leaf code: 420 LoRA factors). The sampler's prefill/decode
#    programs of a run (both agents' rollout buckets and the evaluation's) hold about
#    CPU_SAMPLER_PROGRAM_BYTES_PER_LAYER.
CPU_RUNTIME_BYTES = 450 * 2**20
CPU_UPDATE_PROGRAM_BYTES_PER_LAYER = {False: 19 * 2**20, True: 9 * 2**20}
CPU_LOGPROB_PROGRAM_BYTES_PER_LAYER = {False: 3 * 2**20, True: 2**20 // 3}
CPU_SAMPLER_PROGRAM_BYTES_PER_LAYER = 28 * 2**20


def training_program_bytes_per_layer(cfg: TrainConfig, layout: AgentLayout) -> int:
    """One trained role's compiled training programs, per decoder layer: the update and its log-prob passes."""
    passes = (not cfg.old_logprobs_in_update) + layout.needs_reference
    scan = cfg.model.scan_layers
    return CPU_UPDATE_PROGRAM_BYTES_PER_LAYER[scan] + passes * CPU_LOGPROB_PROGRAM_BYTES_PER_LAYER[scan]


def program_bytes(cfg: TrainConfig, layout: AgentLayout, num_layers: int) -> int:
    """Host memory of the compiled programs alive at once on XLA:CPU: the sampler's, plus the
    training programs of the roles trained together in one phase (``memory.release_programs='phase'``
    drops the others at each phase start) or of every role the schedule trains (``'end'``)."""
    together = len(layout.roles) if layout.shared or cfg.schedule.kind == "simultaneous" else 1
    live = together if cfg.memory.release_programs == "phase" else len(layout.roles)
    per_role = training_program_bytes_per_layer(cfg, layout)
    return num_layers * (live * per_role + CPU_SAMPLER_PROGRAM_BYTES_PER_LAYER)


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
    eval_call = min(cfg.loop.eval_questions, cfg.loop.eval_batch_size or cfg.loop.eval_questions)  # rows per call
    eval_rows = next((b for b in buckets if b >= eval_call), buckets[-1]) if eval_call else 0
    rounds = cfg.rollout.max_turns if cfg.rollout.mode == "multi_turn" else 1
    loss_positions = min(rounds * (cfg.rollout.max_new_tokens + 1), cfg.loop.max_seq_len)  # Learner.max_loss_tokens
    # the host's own rows only where the one device is the host (a CPU mesh's devices share them)
    cpu = mesh is None and jax.devices()[0].platform == "cpu"
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
        fused_copies=sampler.fused_cache_size,
        loss_positions=loss_positions,
        eval_batch=eval_rows,
        prompt_len=length_bucket(cfg.rollout.max_prompt_len),
        remat=model_config.remat,
        logits_chunk=model_config.logits_chunk,
        runtime_bytes=CPU_RUNTIME_BYTES if cpu else 0,
        program_bytes=program_bytes(cfg, layout, model_config.num_layers) if cpu else 0,
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
