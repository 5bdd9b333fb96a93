"""The tasks a run trains and evaluates on: the configured split, and a stratified held-out subset."""

from __future__ import annotations

from typing import Sequence

from rema_jax.tasks.types import Task


def load_tasks(config) -> tuple[list[Task], list[Task]]:
    """(train, held-out test) tasks of a ``TrainConfig``'s data section."""
    data = config.data
    if data.source == "builtin":
        from rema_jax.tasks.builtin import builtin_split

        return builtin_split(
            data.train_per_cell, data.test_per_cell, seed=data.split_seed, families=data.families, levels=data.levels
        )
    from rema_jax.tasks.loaders import load_benchmark

    train = load_benchmark(data.benchmark, data.train_path, skip_bad_records=data.skip_bad_records).tasks
    test = (
        load_benchmark(data.benchmark, data.test_path, skip_bad_records=data.skip_bad_records).tasks
        if data.test_path
        else []
    )
    return list(train), list(test)


def heldout_subset(tasks: Sequence[Task], n: int) -> list[Task]:
    """The first ``n`` held-out tasks taken round-robin over (subject, level) cells, so a small
    evaluation still covers every task family and level."""
    cells: dict[tuple, list[Task]] = {}
    for t in tasks:
        cells.setdefault((t.subject, t.level), []).append(t)
    out: list[Task] = []
    queues = list(cells.values())
    i = 0
    while len(out) < min(n, len(tasks)):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out
