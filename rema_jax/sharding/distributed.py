"""Multi-process runs: JAX's own distributed runtime, per-host data, cross-host metrics, main-process guard.

One Python process per host (TPU VM worker, or GPU node). `maybe_initialize()` calls
`jax.distributed.initialize()` only when the run spans several processes: on a TPU pod slice (the
TPU runtime tells JAX the coordinator and process ids) or when the environment variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are set (multi-node GPU). After
it, `jax.devices()` lists every device of the slice and one `Mesh` spans all hosts.

Each host loads only its rows of a global batch (`host_rows`) and assembles the global sharded array
from them (`global_batch_from_host`). Metrics computed on host-local values are combined with
`reduce_metrics`; only `is_main_process()` writes logs, plots and non-orbax files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding

from rema_jax.errors import UserError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_TPU_POD_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedConfigError(RuntimeError, UserError):
    """The multi-process environment is incomplete or inconsistent (names the variables)."""


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedConfigError(f"environment variable {name}={env[name]!r} must be an integer") from None


def multiprocess_env(env: Optional[Mapping[str, str]] = None) -> Optional[dict[str, Any]]:
    """Keyword arguments for `jax.distributed.initialize` described by the environment, `{}` when
    the TPU runtime will supply them (a multi-host pod slice), None for a single-process run."""
    env = os.environ if env is None else env
    given = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(n)]
    if given:
        missing = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(n)]
        if missing:
            raise DistributedConfigError(
                f"multi-process run: {given} are set but {missing} are not; set all of "
                f"{ENV_COORDINATOR} (host:port of process 0), {ENV_NUM_PROCESSES} and "
                f"{ENV_PROCESS_ID} (0..N-1) on every process"
            )
        n, pid = _env_int(env, ENV_NUM_PROCESSES), _env_int(env, ENV_PROCESS_ID)
        if n < 1 or not 0 <= pid < n:
            raise DistributedConfigError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={n})")
        if n == 1:
            return None
        return {"coordinator_address": env[ENV_COORDINATOR], "num_processes": n, "process_id": pid}
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


_initialized = False


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Initialises JAX's distributed runtime when the run spans several processes; returns whether
    it did. Must run before anything touches the devices; calling it twice is harmless."""
    global _initialized
    if _initialized:
        return True
    kwargs = multiprocess_env(env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info(
        "jax.distributed initialised: process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """True on process 0 only: the one that writes logs, metrics files and plots."""
    return jax.process_index() == 0


def host_rows(global_batch: int, process_index: Optional[int] = None, process_count: Optional[int] = None) -> slice:
    """The contiguous rows of a global batch this process loads (equal split; raises if it does not divide).

    Matches `global_batch_from_host` when the batch axis is split over all devices in process order.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {pc} processes; use a multiple of {pc}"
        )
    per = global_batch // pc
    return slice(pi * per, (pi + 1) * per)


def global_batch_from_host(local_tree: Any, shardings: Any) -> Any:
    """Global sharded arrays from each process's local rows (`host_rows`) of a batch tree.

    `shardings`: a tree of `NamedSharding` (e.g. `ShardingPlan.batch_shardings`) or one for all leaves.
    In a single process this is a sharded `device_put` of the whole batch.
    """
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, local_tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_tree, shardings)


def reduce_metrics(metrics: Mapping[str, Any], op: str = "mean") -> dict[str, float]:
    """Combines host-local scalar metrics over all processes (`mean`, `sum`, `max` or `min`).

    Values that are already global (outputs of a jitted step over the whole mesh) are the same on
    every process and must not be reduced again; pass only host-local values (e.g. reward stats of
    the rows this host graded, host timings).
    """
    ops = {"mean": np.mean, "sum": np.sum, "max": np.max, "min": np.min}
    if op not in ops:
        raise ValueError(f"reduce_metrics: op={op!r}; expected one of {sorted(ops)}")
    keys = sorted(metrics)
    local = np.asarray([float(np.asarray(metrics[k])) for k in keys], np.float32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, n]
    else:
        gathered = local[None]
    return {k: float(v) for k, v in zip(keys, ops[op](gathered, axis=0))}


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process), e.g. before process 0 reads what all wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
