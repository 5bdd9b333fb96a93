"""Tasks: the `Task` record, the built-in procedural generator, file and TFDS loaders."""

from rema_jax.tasks.builtin import FAMILIES, NUM_LEVELS, SEED_EXAMPLE, builtin_split, make_task
from rema_jax.tasks.loaders import BENCHMARKS, BadRecordError, Benchmark, LoadStats, load_benchmark, register_benchmark
from rema_jax.tasks.tfds_loader import TFDSUnavailableError, load_tfds
from rema_jax.tasks.types import Task, judge_task

__all__ = [
    "BENCHMARKS",
    "BadRecordError",
    "Benchmark",
    "FAMILIES",
    "LoadStats",
    "NUM_LEVELS",
    "SEED_EXAMPLE",
    "TFDSUnavailableError",
    "Task",
    "builtin_split",
    "judge_task",
    "load_benchmark",
    "load_tfds",
    "make_task",
    "register_benchmark",
]
