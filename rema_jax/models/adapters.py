"""Per-agent adapter trees: `lora`, `full` or `shared` (None), plus init and merge.

Both ReMA agents share one base parameter tree. An agent's `Adapter` is a pytree whose static fields
(`kind`, `scale`) are part of the tree structure, so two agents' adapters of the same structure hit
the same compiled `forward` (switching agents never recompiles). `adapter=None` is the base model:
the `shared` mode and the reference policy, with no copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from rema_jax.models.config import ModelConfig
from rema_jax.models.layers import ATTENTION_PROJS, MLP_PROJS, Params

ADAPTER_KINDS = ("lora", "full", "shared")
ALL_TARGETS = ATTENTION_PROJS + MLP_PROJS


@struct.dataclass
class Adapter:
    """One agent's adapter. `weights`: the LoRA tree (`{"layers_i": {"self_attn": {"q_proj":
    {"lora_a": [in, r], "lora_b": [r, out]}}}}`) or, for `full`, a complete params tree.
    `scale` = alpha / rank (LoRA only)."""

    weights: Any
    kind: str = struct.field(pytree_node=False, default="lora")
    scale: float = struct.field(pytree_node=False, default=1.0)


def trains_head(adapter: "Adapter | None") -> bool:
    """Whether an agent with this adapter trains the LM head: a full copy or the shared model (None)
    does; a LoRA agent's head is the frozen base's (LoRA never targets it)."""
    return not (adapter is not None and adapter.kind == "lora")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """How an agent's adapter is built. `rank`/`alpha`/`targets` only matter for `lora`."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"AdapterConfig.kind={self.kind!r}; expected one of {ADAPTER_KINDS}")
        if self.kind == "lora":
            if not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"AdapterConfig.rank must be a positive int, got {self.rank!r}")
            if not self.alpha > 0:
                raise ValueError(f"AdapterConfig.alpha must be > 0, got {self.alpha!r}")
            targets = tuple(self.targets)
            unknown = sorted(set(targets) - set(ALL_TARGETS))
            if unknown or not targets:
                raise ValueError(f"AdapterConfig.targets={targets!r}: unknown {unknown}; choose from {ALL_TARGETS}")
            object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def _module_of(target: str) -> str:
    return "self_attn" if target in ATTENTION_PROJS else "mlp"


def init_adapter(
    config: ModelConfig, params: Params, adapter_config: AdapterConfig, key: jax.Array, dtype: Optional[Any] = None
) -> Optional[Adapter]:
    """A fresh adapter: LoRA with `lora_b = 0` (output equals the base exactly), `full` = a copy of
    `params`, `shared` = None. `dtype` of the LoRA factors defaults to float32 (trainable weights)."""
    if adapter_config.kind == "shared":
        return None
    if adapter_config.kind == "full":
        return Adapter(weights=jax.tree.map(jnp.array, params), kind="full", scale=1.0)
    dtype = dtype or jnp.float32
    r = adapter_config.rank
    tree: dict[str, Any] = {}
    keys = jax.random.split(key, config.num_layers * len(adapter_config.targets))
    k_iter = iter(keys)
    for i in range(config.num_layers):
        layer: dict[str, Any] = {}
        for target in adapter_config.targets:
            module = _module_of(target)
            n_in, n_out = params[f"layers_{i}"][module][target]["kernel"].shape
            bound = 1.0 / (n_in**0.5)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
            layer.setdefault(module, {})[target] = {
                "lora_a": jax.random.uniform(next(k_iter), (n_in, r), dtype, -bound, bound),
                "lora_b": jnp.zeros((r, n_out), dtype),
            }
        tree[f"layers_{i}"] = layer
    return Adapter(weights=tree, kind="lora", scale=adapter_config.scale)


def merge_adapter(params: Params, adapter: Optional[Adapter]) -> Params:
    """The plain params tree an agent effectively uses (LoRA folded into the kernels)."""
    if adapter is None:
        return params
    if adapter.kind == "full":
        return adapter.weights
    if adapter.kind != "lora":
        raise ValueError(f"unknown adapter kind {adapter.kind!r}")
    merged = jax.tree.map(lambda x: x, params)  # new containers, shared leaves
    for layer_name, modules in adapter.weights.items():
        for module, projs in modules.items():
            for proj, ab in projs.items():
                try:
                    kernel = params[layer_name][module][proj]["kernel"]
                except KeyError:
                    raise KeyError(f"adapter targets {layer_name}/{module}/{proj}, absent from params") from None
                delta = adapter.scale * (ab["lora_a"].astype(jnp.float32) @ ab["lora_b"].astype(jnp.float32))
                if delta.shape != kernel.shape:
                    raise ValueError(
                        f"adapter {layer_name}/{module}/{proj}: delta {delta.shape} != kernel {kernel.shape}"
                    )
                merged[layer_name][module][proj] = dict(
                    merged[layer_name][module][proj], kernel=(kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
                )
    return merged
