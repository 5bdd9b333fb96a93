"""The typed batch of one role's rows that the log-prob passes and the RL update read.

Every array field is ``[B, T]`` over the same B rows and T positions, aligned as Contract 4 (docs/
architecture.md): position t of ``loss_mask``/``turn_ids``/``advantages``/``*_logprobs`` scores token t
given tokens < t. A ``TrainBatch`` is a pytree (``flax.struct.dataclass``), so it goes through
``jax.jit``, ``tree_map`` (mini/micro-batch splits) and sharding rules as it is; fields left ``None``
are absent from the tree. ``prefix`` (a ``rl.PrefixPlan``, optional) tells the passes which rows share
a token prefix; its row fields split with the batch (see ``rl.prefix_plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from rema_jax.rl.prefix_plan import PrefixPlan

Array = Any  # jax.Array or np.ndarray (host batches before they are placed)

MODEL_FIELDS = ("tokens", "attention_mask", "loss_mask", "turn_ids")
RL_FIELDS = ("advantages", "old_logprobs")
BEHAVIOUR_FIELDS = ("behaviour_logprobs", "behaviour_mask")


@flax.struct.dataclass
class TrainBatch:
    """One role's rows.

    tokens:         int32   [B, T]  token ids, right-padded
    attention_mask: int32   [B, T]  1 on real tokens
    loss_mask:      float32 [B, T]  1 where the token is the role's own output (trained)
    turn_ids:       int32   [B, T]  the turn of each loss token (0 .. max_turns-1), -1 elsewhere
    advantages:     float32 [B, T]  per-token advantages (the update only)
    old_logprobs:   float32 [B, T]  log π_old of each token, 0 outside loss_mask (the update only; optional
                                    when the update takes π_old from its own forward, see
                                    ``UpdateConfig.old_logprobs``)
    ref_logprobs:   float32 [B, T]  log π_ref, when a KL term reads it
    behaviour_logprobs: float32 [B, T]  the sampler's log-prob of each token it drew (optional, diagnostic:
                                    the update then reports ``behaviour_logprob_gap``)
    behaviour_mask: float32 [B, T]  1 on the loss tokens the sampler drew (with ``behaviour_logprobs``)
    prefix:         PrefixPlan      shared prefixes of the rows, for as many micro-batches as the pass splits
                                    into (None: the plain path)
    """

    tokens: Array
    attention_mask: Array
    loss_mask: Array
    turn_ids: Array
    advantages: Optional[Array] = None
    old_logprobs: Optional[Array] = None
    ref_logprobs: Optional[Array] = None
    behaviour_logprobs: Optional[Array] = None
    behaviour_mask: Optional[Array] = None
    prefix: Optional[PrefixPlan] = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, L)``."""
        return tuple(np.shape(self.tokens))

    def model_inputs(self) -> "TrainBatch":
        """The four fields a forward / log-prob pass reads, and ``prefix`` (the RL fields dropped)."""
        return self.replace(
            **{f.name: None for f in dataclasses.fields(self) if f.name not in MODEL_FIELDS + ("prefix",)}
        )

    def checked(self, role: str, *, rl_fields: bool, ref: bool, old: bool = True) -> "TrainBatch":
        """This batch with exactly the fields a pass needs and ``prefix``, after checking they are
        present and all ``[B, T]`` like ``tokens``. ``ref_logprobs`` is dropped unless ``ref``; with
        ``rl_fields``, ``old_logprobs`` is required when ``old`` (kept when given either way) and the
        behaviour fields are kept when both are given."""
        rl_need = tuple(k for k in RL_FIELDS if old or k != "old_logprobs") if rl_fields else ()
        need = MODEL_FIELDS + rl_need + (("ref_logprobs",) if ref else ())
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            have = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
            raise ValueError(f"batch for role {role!r} is missing {missing}; has {have}")
        if rl_fields and (self.behaviour_logprobs is None) != (self.behaviour_mask is None):
            raise ValueError(f"batch for role {role!r}: give both {BEHAVIOUR_FIELDS} or neither")
        given = ("old_logprobs",) + BEHAVIOUR_FIELDS if rl_fields else ()
        need += tuple(k for k in given if k not in need and getattr(self, k) is not None)
        keep = need + ("prefix",)
        out = self.replace(**{f.name: None for f in dataclasses.fields(self) if f.name not in keep})
        for k in need:
            if np.shape(getattr(out, k)) != self.shape:
                raise ValueError(
                    f"batch[{role!r}].{k} has shape {np.shape(getattr(out, k))}, expected {self.shape} (like 'tokens')"
                )
        if out.prefix is not None and np.shape(out.prefix.row_prefix) != self.shape[:1]:
            raise ValueError(
                f"batch[{role!r}].prefix plans {np.shape(out.prefix.row_prefix)} rows, not {self.shape[0]}"
            )
        return out


def as_train_batch(batch: TrainBatch | Mapping[str, Array]) -> TrainBatch:
    """A ``TrainBatch`` from itself or from a mapping with its field names (other keys are ignored)."""
    if isinstance(batch, TrainBatch):
        return batch
    names = [f.name for f in dataclasses.fields(TrainBatch) if f.name != "prefix"]
    missing = [k for k in MODEL_FIELDS if k not in batch and k != "turn_ids"]
    if missing:
        raise ValueError(f"batch is missing {missing}; has {sorted(batch)}")
    values = {k: batch[k] for k in names if k in batch}
    values.setdefault("turn_ids", None)
    return TrainBatch(**values)


def host_rows(batch: TrainBatch) -> TrainBatch:
    """Every field as a host numpy array of its canonical jax dtype (what the mesh path places)."""
    return jax.tree.map(lambda v: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)), batch)
