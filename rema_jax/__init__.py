"""rema_jax: ReMA in JAX/Flax (see docs/architecture.md)."""

from rema_jax.host_memory import use_memory_scheduler

use_memory_scheduler()  # XLA:CPU: a buffer-reusing schedule (same values); before the backend starts
