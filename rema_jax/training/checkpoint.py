"""Orbax checkpoints for RL training: atomic, keep-last-N, exact resume.

A checkpoint holds everything a killed run needs to continue bit-for-bit: the trainable trees
(adapters, or the base when it is trained), the optimizer state, the PRNG key, and a JSON record
with the step, the data-iterator position and the schedule state. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save never leaves a checkpoint
that ``latest_step`` would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_NONE = "__none__"


def _encode_nones(tree: Any) -> Any:
    """Orbax cannot store ``None`` leaves (e.g. a ``shared`` agent's adapter); mark them."""
    if tree is None:
        return {_NONE: np.zeros((), np.int8)}
    if isinstance(tree, dict):
        return {k: _encode_nones(v) for k, v in tree.items()}
    return tree


def _decode_nones(tree: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_NONE}:
            return None
        return {k: _decode_nones(v) for k, v in tree.items()}
    return tree


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` with a fixed layout.

    Layout of one step: ``state`` (a pytree of arrays, restored into the caller's template so
    dtypes, shapes and shardings match) and ``meta`` (JSON: step, data position, schedule, ...).
    """

    def __init__(self, directory: str, *, keep_last: int = 3, save_every: int = 1, keep_steps: tuple[int, ...] = ()):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        # Synchronous saves: the trainer waits for each save anyway (a resumable run needs the
        # checkpoint on disk before the next step), and async mode only adds a finalize thread.
        if keep_steps:  # the newest ``keep_last`` plus ``keep_steps`` for good
            policies = getattr(ocp, "checkpoint_managers", None)
            if policies is None or not hasattr(policies, "CustomSteps"):
                raise RuntimeError(
                    f"checkpoint keep_steps={tuple(keep_steps)} needs orbax-checkpoint with preservation "
                    "policies (ocp.checkpoint_managers.CustomSteps); upgrade orbax-checkpoint"
                )
            options = ocp.CheckpointManagerOptions(
                create=True,
                enable_async_checkpointing=False,
                preservation_policy=policies.AnyPreservationPolicy(
                    [policies.LatestN(n=keep_last), policies.CustomSteps(steps=list(keep_steps))]
                ),
            )
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-able dict) at ``step``."""
        if not force and self.save_every > 1 and step % self.save_every:
            return False
        state = _encode_nones(state)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        return saved

    def restore(self, step: int | None, template: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (latest when None) into the structure/dtypes of ``template``."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        encoded = _encode_nones(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, encoded)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return _decode_nones(restored.state), dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
