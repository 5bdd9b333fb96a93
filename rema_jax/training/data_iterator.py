"""A deterministic, resumable iterator over a task list.

Epoch ``e`` visits the tasks in ``permutation(seed, e)``; the whole state is one integer
(``position`` = number of tasks handed out so far), stored in checkpoints so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class TaskIterator(Generic[T]):
    def __init__(self, tasks: Sequence[T], batch_size: int, *, seed: int, position: int = 0):
        if not tasks:
            raise ValueError("TaskIterator needs at least one task")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.position = position

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.tasks))

    def peek(self, n: int | None = None) -> list[T]:
        """The next ``n`` tasks (default one batch) without advancing."""
        n = self.batch_size if n is None else n
        out, pos = [], self.position
        while len(out) < n:
            epoch, offset = divmod(pos, len(self.tasks))
            order = self._order(epoch)
            take = min(n - len(out), len(self.tasks) - offset)
            out.extend(self.tasks[i] for i in order[offset : offset + take])
            pos += take
        return out

    def next(self, n: int | None = None) -> list[T]:
        batch = self.peek(n)
        self.position += len(batch)
        return batch

    @property
    def epoch(self) -> int:
        return self.position // len(self.tasks)
