"""rema_jax: ReMA in JAX/Flax (see docs/architecture.md)."""

from rema_jax.host_memory import trim_after_compiles, use_memory_scheduler

use_memory_scheduler()  # XLA:CPU: a buffer-reusing schedule (same values); before the backend starts
trim_after_compiles()  # give the compiler's freed heap back before a new executable runs
