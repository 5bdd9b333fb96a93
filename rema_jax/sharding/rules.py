"""Logical-axis sharding rules (MaxText `logical_axis_rules` style) and the trees of shardings they give.

Every array dimension gets a *logical* name (`embed`, `q_heads`, `mlp`, `vocab`, `batch`, ...);
`rules` — plain data — maps each logical name to mesh axes. The logical names of a parameter come
from its Contract-1 path suffix, so one function covers the base params, every agent's adapter tree
(`.../q_proj/lora_a`), full-fine-tuning adapters, and optimizer states (optax states mirror the
trainable tree, so `mu/layers_0/mlp/up_proj/kernel` ends in the same suffix).

A dimension whose size does not divide over its mesh axes is not sharded over them (the trailing
axes are dropped until it divides, or the dimension is replicated), with one logged warning per
(parameter kind, axis) — e.g. SmolLM2's 9 heads on `tensor=4`. A shape is never silently padded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Iterable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rema_jax.errors import UserError
from rema_jax.models.config import ModelConfig
from rema_jax.sharding.mesh import MESH_AXES, mesh_sizes

log = logging.getLogger(__name__)

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

# logical axis → mesh axes. Parameters: `embed` (hidden) is FSDP-sharded, head/MLP/vocab widths are
# tensor-sharded. Batch-like axes split over data and fsdp. Everything else is replicated.
DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    # KV cache (Contract 2: [B, max_len, kv_heads, head_dim])
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
    ("head_dim", None),
    # activations and batches
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Contract-1 projection → logical axes of its kernel [in, out].
KERNEL_AXES: dict[str, tuple[str, str]] = {
    "q_proj": ("embed", "q_heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}
CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_seq", "head_dim")  # layers.KVCache.v: [B, kv, C, hd]
KEY_CACHE_AXES = ("cache_batch", "cache_kv_heads", "head_dim", "cache_seq")  # layers.KVCache.k: [B, kv, hd, C]
KV_CACHE_AXES = {"k": KEY_CACHE_AXES, "v": CACHE_AXES}  # per `layers.KVCache` field
_HEAD_AXES = ("q_heads", "kv_heads", "cache_kv_heads", "act_heads")
_warned: set[tuple] = set()


class ShardingRulesError(ValueError, UserError):
    """A rules table or a tree does not fit the sharding machinery (names what and where)."""


def validate_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """`rules` as a dict logical name → tuple of mesh axes; raises on unknown axes or duplicates."""
    out: dict[str, tuple[str, ...]] = {}
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ShardingRulesError(f"sharding rule #{i} must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ShardingRulesError(
                f"sharding rule {name!r} → {axes}: unknown mesh axes {unknown}; mesh axes are {MESH_AXES}"
            )
        if name in out:
            raise ShardingRulesError(f"sharding rules name {name!r} twice")
        out[name] = axes
    return out


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """A jax key path as plain strings (dict keys, attribute names, sequence indices)."""
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def param_logical_axes(keys: Sequence[str], ndim: int) -> Optional[tuple[Optional[str], ...]]:
    """Logical axes of a leaf from its path suffix (Contract 1 params, LoRA factors, their optimizer
    moments); None when the path is not a known parameter kind or the rank does not match."""
    if not keys:
        return None
    last, parent = keys[-1], (keys[-2] if len(keys) > 1 else "")
    axes: Optional[tuple] = None
    if last == "embedding" and parent == "embed_tokens":
        axes = ("vocab", "embed")
    elif last == "kernel" and parent in KERNEL_AXES:
        axes = KERNEL_AXES[parent]
    elif last == "bias" and parent in KERNEL_AXES:
        axes = (KERNEL_AXES[parent][1],)
    elif last == "scale" and (parent.endswith("layernorm") or parent == "norm"):
        axes = ("norm",)
    elif last == "lora_a" and parent in KERNEL_AXES:
        axes = (KERNEL_AXES[parent][0], "lora_rank")
    elif last == "lora_b" and parent in KERNEL_AXES:
        axes = ("lora_rank", KERNEL_AXES[parent][1])
    if axes is None or len(axes) != ndim:
        return None
    return axes


def _units(logical: Optional[str], size: int, config: Optional[ModelConfig]) -> int:
    """How many indivisible units a dimension has: heads for head axes (a shard never splits a
    head), the size otherwise."""
    if config is not None and logical in ("q_heads", "act_heads"):
        return config.num_heads
    if config is not None and logical in ("kv_heads", "cache_kv_heads"):
        return config.num_kv_heads
    return size


def _warn_once(what: str, logical: str, dropped: tuple[str, ...], units: int, sizes: dict[str, int]) -> None:
    key = (re.sub(r"layers_\d+", "layers_*", what), logical, dropped)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "sharding: %s dim %r (%d units) does not divide over mesh axes %s (sizes %s); not sharding it over %s",
            what,
            logical,
            units,
            dropped,
            {a: sizes[a] for a in dropped},
            dropped,
        )


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    shape: Sequence[int],
    sizes: dict[str, int],
    rules: Rules = DEFAULT_RULES,
    config: Optional[ModelConfig] = None,
    what: str = "array",
) -> P:
    """The `PartitionSpec` of an array of `shape` whose dims have `logical_axes`.

    Mesh axes of size 1 are left out; a mesh axis already used by an earlier dim is not reused;
    trailing mesh axes are dropped (with a warning) until the dim's units divide their product.
    """
    if len(logical_axes) != len(shape):
        raise ShardingRulesError(
            f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} for a "
            f"rank-{len(shape)} array {tuple(shape)}"
        )
    table = validate_rules(rules)
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ShardingRulesError(
                f"{what}: logical axis {logical!r} has no sharding rule; rules define {sorted(table)}"
            )
        axes = tuple(a for a in table[logical] if sizes.get(a, 1) > 1 and a not in used)
        units = _units(logical, int(size), config)
        kept = axes
        while kept and (units % math.prod(sizes[a] for a in kept) or int(size) % math.prod(sizes[a] for a in kept)):
            kept = kept[:-1]
        if kept != axes:
            _warn_once(what, logical, axes[len(kept) :], units, sizes)
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def shard_shape(shape: Sequence[int], spec: P, sizes: dict[str, int]) -> tuple[int, ...]:
    """The per-device block shape of an array of `shape` laid out by `spec` over a mesh of `sizes`."""
    out = list(shape)
    for i, axes in enumerate(tuple(spec)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        out[i] //= math.prod(sizes[a] for a in axes)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Mesh + rules + model config: turns pytrees into trees of `NamedSharding`s and places them.

    `mesh` may be a real `Mesh` or, for planning without devices (memory estimates for a pod from a
    laptop), a dict of axis sizes; only the `*_specs` methods work then.
    """

    mesh: Any
    config: Optional[ModelConfig] = None
    rules: Rules = DEFAULT_RULES
    strict: bool = False  # raise (instead of replicating) on a non-scalar leaf of unknown kind

    def __post_init__(self):
        validate_rules(self.rules)

    @property
    def sizes(self) -> dict[str, int]:
        return mesh_sizes(self.mesh)

    def _named(self, spec: P) -> NamedSharding:
        if not isinstance(self.mesh, Mesh):
            raise ShardingRulesError(
                "this ShardingPlan was built from axis sizes, not a Mesh: it can compute "
                "PartitionSpecs (for memory planning) but not shardings"
            )
        return NamedSharding(self.mesh, spec)

    # ------------------------------------------------------------------ specs
    def spec(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int], what: str = "array") -> P:
        return logical_to_spec(logical_axes, shape, self.sizes, self.rules, self.config, what)

    def leaf_spec(self, keys: tuple[str, ...], shape: Sequence[int]) -> P:
        """Spec of one parameter-like leaf (param / adapter factor / optimizer moment) at `keys`."""
        what = "/".join(keys) or "<root>"
        axes = param_logical_axes(keys, len(shape))
        if axes is None:
            if len(shape) and self.strict:
                raise ShardingRulesError(
                    f"{what}: shape {tuple(shape)} is not a known parameter kind "
                    "(Contract 1 path suffix); cannot choose its sharding"
                )
            if len(shape):
                log.debug("sharding: %s %s is not a known parameter kind; replicated", what, tuple(shape))
            return P()
        return self.spec(axes, shape, what)

    def tree_specs(self, tree: Any) -> Any:
        """PartitionSpecs for every leaf of a params / adapter / optimizer-state tree (by path suffix)."""
        return jax.tree_util.tree_map_with_path(lambda p, x: self.leaf_spec(path_keys(p), np.shape(x)), tree)

    def batch_spec(self, shape: Sequence[int], what: str = "batch") -> P:
        """Leading dim on `batch` (data × fsdp), the rest replicated."""
        return self.spec(("batch",) + (None,) * (len(shape) - 1), shape, what)

    def cache_specs(self, cache: Any) -> Any:
        """Specs of the sampler's KV cache (Contract 2: per layer a `layers.KVCache`, keys `k` of
        `[B, kv_heads, head_dim, max_len]` and values `v` of `[B, kv_heads, max_len, head_dim]`)."""

        def one(p, x):
            keys = path_keys(p)
            if np.ndim(x) != 4:
                raise ShardingRulesError(
                    f"KV cache leaf {'/'.join(keys)} has shape {np.shape(x)}; Contract 2 expects "
                    "k [B, kv_heads, head_dim, max_len] and v [B, kv_heads, max_len, head_dim]"
                )
            axes = KV_CACHE_AXES.get(keys[-1] if keys else "", CACHE_AXES)
            return self.spec(axes, np.shape(x), "kv_cache")

        return jax.tree_util.tree_map_with_path(one, cache)

    # ------------------------------------------------------------------ shardings
    def replicated(self) -> NamedSharding:
        return self._named(P())

    def tree_shardings(self, tree: Any) -> Any:
        return jax.tree.map(self._named, self.tree_specs(tree), is_leaf=lambda x: isinstance(x, P))

    def batch_shardings(self, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: self._named(self.batch_spec(np.shape(x), "/".join(path_keys(p)) or "batch")), tree
        )

    def cache_shardings(self, cache: Any) -> Any:
        return jax.tree.map(self._named, self.cache_specs(cache), is_leaf=lambda x: isinstance(x, P))

    def activation_sharding(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
        """For `jax.lax.with_sharding_constraint` on an activation, e.g. `("batch", "seq", "act_embed")`."""
        return self._named(self.spec(logical_axes, shape, "activation"))

    # ------------------------------------------------------------------ placement
    def put(self, tree: Any, shardings: Any = None) -> Any:
        """Places `tree` with `shardings` (default: `tree_shardings(tree)`); see `place`."""
        shardings = self.tree_shardings(tree) if shardings is None else shardings
        return jax.tree.map(place, tree, shardings)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` as a global array with `sharding`. A host (numpy) value is sliced per addressable shard
    (`jax.make_array_from_callback`), so each device receives only its block and multi-process runs
    work when every process holds the same value; a jax array is resharded with `device_put`."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def describe(tree: Any, shardings: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, global shape, spec) rows: a readable dump of how a tree is laid out."""
    rows = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, (NamedSharding, P)))
    for (p, x), s in zip(flat, specs):
        rows.append(("/".join(path_keys(p)), tuple(np.shape(x)), str(getattr(s, "spec", s))))
    return rows


def unknown_leaves(tree: Any) -> list[str]:
    """Paths of non-scalar leaves that no rule recognises (they would be replicated)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        "/".join(path_keys(p)) for p, x in flat if np.ndim(x) and param_logical_axes(path_keys(p), np.ndim(x)) is None
    ]


def iter_param_specs(shapes: Any, plan: ShardingPlan) -> Iterable[tuple[tuple[str, ...], tuple[int, ...], P]]:
    """(path keys, shape, spec) for a tree whose leaves are shape tuples (`param_shapes(config)`)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    for p, shape in flat:
        keys = path_keys(p)
        yield keys, tuple(shape), plan.leaf_spec(keys, shape)
