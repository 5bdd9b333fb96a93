"""Memory planning: bytes per device for each kind of state, computed before anything is compiled.

Parameters, adapters, optimizer moments, gradients, the sampler's fused weights and the KV cache
are *exact* per-device figures: shapes from the config, per-device block shapes from the same
sharding rules the run uses. Training activations are an *estimate* (what a non-rematerialised
backward pass keeps alive per token, see `activation_bytes_per_token`). A run has two phases that
do not overlap: rollout (resident state + fused weights + KV cache) and update (resident state +
gradients + activations); the peak is the larger. `check_fits` refuses a plan whose peak exceeds
the device memory, printing the whole breakdown, instead of letting XLA fail with an OOM later.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from rema_jax.errors import UserError
from rema_jax.models import layers
from rema_jax.models.adapters import ALL_TARGETS
from rema_jax.models.config import ModelConfig
from rema_jax.models.layers import ATTENTION_PROJS
from rema_jax.models.transformer import head_chunks, param_shapes
from rema_jax.sharding.mesh import mesh_sizes
from rema_jax.sharding.rules import (
    DEFAULT_RULES,
    KV_CACHE_AXES,
    Rules,
    ShardingPlan,
    iter_param_specs,
    shard_shape,
)

GiB = 1024**3
# With remat, XLA:CPU keeps this share of the non-remat activations live in the measured RL update
# (SmolLM2, 8 x 352 rows: 1425 MiB of scratch, logits included, against 6803 MiB without remat under
# the same scheduler; benchmarks/update_memory.py). It was 0.52 (3566 MiB) with ``nn.remat``, whose
# deferred weight gradients kept every layer's activations; `models.transformer.tied_remat` fixed that.
REMAT_LIVE_FRACTION = 0.21
# the sampler's cache axes, per `layers.KVCache` field (the ones `ShardingPlan.cache_specs` uses)
KV_CACHE_AXES = layers.KVCache(**KV_CACHE_AXES)


class MemoryPlanError(RuntimeError, UserError):
    """The configuration cannot fit the device memory; the message carries the per-device breakdown."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes by kind (`rows`), phase peaks, and what the figures assume (`notes`)."""

    rows: dict[str, int]
    rollout_bytes: int
    update_bytes: int
    mesh: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int:
        return max(self.rollout_bytes, self.update_bytes)

    def table(self, device_memory_bytes: Optional[int] = None) -> str:
        """A fixed-width table of the breakdown (GiB and MiB per device)."""
        lines = [f"memory plan per device (mesh {self.mesh})", f"{'kind':<28}{'MiB':>12}{'GiB':>10}"]
        for name, b in self.rows.items():
            lines.append(f"{name:<28}{b / 2**20:>12.1f}{b / GiB:>10.3f}")
        lines.append("-" * 50)
        for name, b in (
            ("rollout phase total", self.rollout_bytes),
            ("update phase total", self.update_bytes),
            ("peak", self.peak_bytes),
        ):
            lines.append(f"{name:<28}{b / 2**20:>12.1f}{b / GiB:>10.3f}")
        if device_memory_bytes:
            lines.append(f"{'device memory':<28}{device_memory_bytes / 2**20:>12.1f}{device_memory_bytes / GiB:>10.3f}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": dict(self.rows),
            "rollout_bytes": self.rollout_bytes,
            "update_bytes": self.update_bytes,
            "peak_bytes": self.peak_bytes,
            "mesh": dict(self.mesh),
        }


def _itemsize(dtype: Any) -> int:
    return int(np.dtype(jax.numpy.dtype(dtype)).itemsize)


def _tree_bytes(rows: Sequence[tuple[tuple[str, ...], tuple[int, ...]]], plan: ShardingPlan, itemsize: int) -> int:
    total = 0
    for keys, shape in rows:
        total += math.prod(shard_shape(shape, plan.leaf_spec(keys, shape), plan.sizes)) * itemsize
    return total


def lora_shapes(
    config: ModelConfig, rank: int, targets: Sequence[str] = ALL_TARGETS
) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(path, shape) of every LoRA factor of one agent (Contract 1 adapter layout)."""
    shapes = param_shapes(config)
    out = []
    for i in range(config.num_layers):
        for t in targets:
            module = "self_attn" if t in ATTENTION_PROJS else "mlp"
            n_in, n_out = shapes[f"layers_{i}"][module][t]["kernel"]
            base = (f"layers_{i}", module, t)
            out += [(base + ("lora_a",), (n_in, rank)), (base + ("lora_b",), (rank, n_out))]
    return out


def activation_bytes_per_token(
    config: ModelConfig,
    seq_len: int,
    sizes: dict[str, int],
    lora_rank: int = 0,
    *,
    remat: bool = False,
    include_logits: bool = True,
) -> float:
    """Estimated bytes of backward-pass scratch per training token.

    Per layer, in the compute dtype unless said: the residual input, norm outputs and post-attention
    residual (4·H), q/k/v and the attention output (2·nh·hd + 2·nkv·hd), the gated MLP's
    intermediates and their gradients (5·F), LoRA `x@A` terms (7·r); attention: float32 scores, the
    masked scores and the broadcast mask (3·nh·T·4) and the probabilities (nh·T). Calibrated on
    XLA:CPU (SmolLM2, 8×352 rows: 8.1 GB measured without remat). ``remat``: `REMAT_LIVE_FRACTION`
    of that (measured; in theory only the layer inputs and one layer's scratch), plus the values
    `ModelConfig.remat_policy` keeps in every layer (``save_mlp``: 2·F). ``include_logits``: plus float32 logits,
    log-softmax and their gradient at every position (3·V; the plan counts them at the loss
    positions instead). Head/MLP/vocab terms are divided by the `tensor` axis when it divides them.
    """
    t = sizes.get("tensor", 1)
    th = t if config.num_heads % t == 0 else 1
    tkv = t if config.num_kv_heads % t == 0 else 1
    tf = t if config.intermediate_size % t == 0 else 1
    tv = t if config.vocab_size % t == 0 else 1
    c = _itemsize(config.compute_dtype)
    hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    per_layer = (
        (4 * config.hidden_size + 7 * lora_rank) * c
        + (2 * nh * hd / th + 2 * nkv * hd / tkv) * c
        + 5 * config.intermediate_size / tf * c
        + nh * seq_len / th * (c + 12)
    )
    layers_b = config.num_layers * per_layer * (REMAT_LIVE_FRACTION if remat else 1.0)
    if remat and config.remat_policy == "save_mlp":  # every layer keeps its gate and up products
        layers_b += config.num_layers * 2 * config.intermediate_size / tf * c
    return layers_b + (3 * config.vocab_size / tv * 4 if include_logits else 0)


def prefill_bytes_per_token(config: ModelConfig, prompt_len: int, sizes: dict[str, int]) -> float:
    """Estimated live bytes per prompt token of one prefill layer (forward only, layers in turn):
    hidden states (4·H), q/k/v (2·nh·hd + 2·nkv·hd), MLP intermediates (3·F) in the compute dtype,
    float32 scores and masked scores plus the probabilities (nh·P·(8 + c))."""
    t = sizes.get("tensor", 1)
    th = t if config.num_heads % t == 0 else 1
    c = _itemsize(config.compute_dtype)
    hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    return (
        4 * config.hidden_size + 2 * nh * hd / th + 2 * nkv * hd / th + 3 * config.intermediate_size / t
    ) * c + nh * prompt_len / th * (8 + c)


def plan_memory(
    config: ModelConfig,
    mesh: Any,
    *,
    rules: Rules = DEFAULT_RULES,
    adapter_kind: str = "lora",
    lora_rank: int = 8,
    lora_targets: Sequence[str] = ALL_TARGETS,
    num_agents: int = 2,
    optimizer_moments: int = 2,
    train_batch: int = 8,
    train_seq: int = 1024,
    rollout_batch: int = 64,
    cache_len: int = 2048,
    fused_copies: int = 2,
    lora_dtype: str = "float32",
    reference_copy: bool = False,
    loss_positions: Optional[int] = None,
    eval_batch: int = 0,
    prompt_len: Optional[int] = None,
    remat: bool = False,
    logits_chunk: int = 0,
    runtime_bytes: int = 0,
    program_bytes: int = 0,
) -> MemoryPlan:
    """Per-device memory of a ReMA run on `mesh` (a `Mesh` or a dict of axis sizes).

    `adapter_kind`: `lora` (each agent trains LoRA factors in `lora_dtype`), `full` (each agent has
    a full params copy in `param_dtype`) or `shared` (both roles train the base itself).
    `optimizer_moments`: state arrays per trainable parameter (AdamW: 2). `train_batch`/`train_seq`:
    rows and length of one update micro-batch; `rollout_batch`/`cache_len`: the sampler's KV cache
    (`layers.KVCache` per layer, batch bucket x cache slots, compute dtype);
    `fused_copies`: agents whose decode-ready fused weights the sampler keeps (`sampler_weights_dtype`).
    `reference_copy`: a frozen copy of the starting trainable trees is kept for a KL term
    (`AgentLayout.copies_reference`): the shared model, or every agent's warm-start adapter.
    The optimizer state is updated in place (the learner donates it), so it is counted once.
    `loss_positions`: the vocabulary positions per row of the loss (the learner's `max_loss_tokens`;
    None = every position). `eval_batch`: the held-out evaluation's sampler batch (its KV cache and
    prefill count when larger than the rollout's). `prompt_len`: the prefill's prompt bucket
    (default `cache_len`). `remat`: the training forward recomputes layers (`ModelConfig.remat`).
    `logits_chunk`: loss positions projected at a time (`ModelConfig.logits_chunk`; 0 = all of them):
    only one chunk's float32 logits, log-softmax and gradient are live.
    `runtime_bytes` / `program_bytes`: the process's XLA runtime and the compiled programs it keeps
    (host memory on CPU, where they share RAM with the arrays; 0 on accelerators).
    """
    if adapter_kind not in ("lora", "full", "shared"):
        raise ValueError(f"plan_memory: adapter_kind={adapter_kind!r}; expected 'lora', 'full' or 'shared'")
    sizes = mesh_sizes(mesh)
    plan = ShardingPlan(sizes, config, rules)
    base_rows = [(k, s) for k, s, _ in iter_param_specs(param_shapes(config), plan)]
    p_item = _itemsize(config.params_dtype)
    params_b = _tree_bytes(base_rows, plan, p_item)
    if adapter_kind == "lora":
        lrows = lora_shapes(config, lora_rank, lora_targets)
        trainable_one = _tree_bytes(lrows, plan, _itemsize(lora_dtype))
        adapters_b, trainable_b = num_agents * trainable_one, num_agents * trainable_one
    elif adapter_kind == "full":
        adapters_b = trainable_b = num_agents * params_b
    else:
        adapters_b, trainable_b = 0, params_b
    opt_b = optimizer_moments * trainable_b
    grads_b = trainable_b
    c_item = _itemsize(config.compute_dtype)
    head_rows = [(("lm_head", "kernel"), (config.hidden_size, config.vocab_size))]
    head_b = _tree_bytes(head_rows, plan, c_item) if config.tie_word_embeddings else 0
    w_item = _itemsize(config.sampler_weights_dtype)  # the fused matrices' dtype (norm scales are ~0.1%)
    fused_head_b = _tree_bytes(head_rows, plan, w_item) if config.tie_word_embeddings else 0
    fused_b = fused_copies * (_tree_bytes(base_rows, plan, w_item) + fused_head_b)  # + the transposed tied head

    sampler_batch = max(rollout_batch, eval_batch)
    cache_shapes = layers.kv_cache_shapes(config, sampler_batch, cache_len)  # what the sampler allocates
    kv_elems = sum(
        math.prod(shard_shape(shape, plan.spec(axes, shape, "kv_cache"), sizes))
        for shape, axes in zip(cache_shapes, KV_CACHE_AXES)
    )
    kv_b = config.num_layers * kv_elems * _itemsize(layers.kv_cache_dtype(config))
    p_len = cache_len if prompt_len is None else prompt_len
    sampler_block = shard_shape((sampler_batch,), plan.batch_spec((sampler_batch,)), sizes)[0]
    prefill_b = int(sampler_block * p_len * prefill_bytes_per_token(config, p_len, sizes))

    batch_block = shard_shape((train_batch,), plan.batch_spec((train_batch,)), sizes)[0]
    act_b = int(
        batch_block
        * train_seq
        * activation_bytes_per_token(
            config,
            train_seq,
            sizes,
            lora_rank if adapter_kind == "lora" else 0,
            remat=remat,
            include_logits=False,
        )
    )
    k = train_seq if loss_positions is None else min(loss_positions, train_seq)
    tv = sizes.get("tensor", 1) if config.vocab_size % sizes.get("tensor", 1) == 0 else 1
    _, k_live = head_chunks(k, logits_chunk)  # rl.losses.head_logprobs_and_entropy's chunks
    logits_b = int(batch_block * k_live * 3 * config.vocab_size / tv * 4)  # fp32 logits, log-softmax, gradient

    reference_b = trainable_b if reference_copy else 0  # the shared model or the agents' adapters
    rows = {
        "params (base)": params_b,
        "adapters": adapters_b,
        "reference copy (KL)": reference_b,
        "optimizer state": opt_b,
        "gradients": grads_b,
        "sampler fused weights": fused_b,
        "kv cache": kv_b,
        "prefill (estimate)": prefill_b,
        "LM head copy (update)": head_b,
        "activations (estimate)": act_b,
        "logits at loss positions": logits_b,
        "XLA runtime": int(runtime_bytes),
        "compiled programs": int(program_bytes),
    }
    resident = params_b + adapters_b + reference_b + opt_b + int(runtime_bytes) + int(program_bytes)
    notes = (
        f"{adapter_kind} x{num_agents} agents, {optimizer_moments} optimizer moments per trainable value",
        f"update micro-batch {train_batch}x{train_seq} ({batch_block} rows/device), {k} loss positions "
        f"({k_live} projected at a time), "
        f"remat {'on' if remat else 'off'}; sampler batch {sampler_batch} (rollout {rollout_batch}, "
        f"eval {eval_batch}), prompt {p_len}, cache {cache_len}",
        "rollout = params+adapters+reference+optimizer+fused+kv+prefill+runtime+programs; "
        "update = params+adapters+reference+optimizer+grads+LM head+activations+logits+runtime+programs",
    )
    return MemoryPlan(
        rows, resident + fused_b + kv_b + prefill_b, resident + grads_b + head_b + act_b + logits_b, sizes, notes
    )


def device_memory_bytes(device: Optional[jax.Device] = None, default: Optional[int] = None) -> Optional[int]:
    """The accelerator's memory limit from `device.memory_stats()` (GPU/TPU), else `default`."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return default


def check_fits(plan: MemoryPlan, device_memory: Optional[int], headroom: float = 0.9) -> None:
    """Raises `MemoryPlanError` (with the breakdown) when the plan's peak exceeds `headroom` of the
    device memory. `device_memory=None` (unknown, e.g. CPU without a configured value) checks nothing."""
    if not 0 < headroom <= 1:
        raise ValueError(f"check_fits: headroom must be in (0, 1], got {headroom}")
    if device_memory is None:
        return
    budget = headroom * device_memory
    if plan.peak_bytes > budget:
        worst = max(plan.rows, key=plan.rows.get)
        raise MemoryPlanError(
            f"this configuration needs {plan.peak_bytes / GiB:.2f} GiB per device at its peak but only "
            f"{budget / GiB:.2f} GiB ({headroom:.0%} of {device_memory / GiB:.2f} GiB) is usable; largest item: "
            f"{worst}. Shard more (fsdp/tensor), shrink the batch / cache length, or use LoRA.\n"
            + plan.table(device_memory)
        )
