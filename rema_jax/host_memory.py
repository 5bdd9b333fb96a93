"""Host memory of CPU runs: XLA:CPU's scheduler, and giving freed memory back between phases.

* XLA:CPU's default *concurrency-optimized* scheduler orders a program for parallelism and keeps
  every layer's backward temporaries alive at once, which also defeats rematerialisation (the RL
  update of the main command: 8.1 GB of scratch with or without ``ModelConfig.remat``).
  ``use_memory_scheduler()`` switches it off through ``XLA_FLAGS`` (the same ops, so the same values,
  in an order that reuses buffers); ``import rema_jax`` calls it, which takes effect when the XLA
  backend has not started yet. ``REMA_JAX_CPU_SCHEDULER=concurrency`` keeps XLA's default.
* XLA compiles in the C heap too: compiling the RL update of the main command leaves ~1.5 GB of
  freed compiler memory in the process, and the update then runs on top of it (measured with
  benchmarks/update_memory.py: RSS 3288 MiB after the compile, 1748 after ``malloc_trim``).
  ``trim_after_compiles()`` trims after every backend compile that took at least
  ``TRIM_MIN_COMPILE_S`` (a jax.monitoring listener, so before the new executable first runs);
  ``import rema_jax`` calls it. ``REMA_JAX_TRIM_AFTER_COMPILE=0`` turns it off.
* ``PeakRss``: the peak resident set of a span of code (a bootstrap stage, a trainer phase), nested
  spans allowed (the kernel keeps one high-water mark per process; see the class).
* XLA:CPU buffers and numpy arrays come from the C heap. Freed blocks below glibc's mmap threshold
  stay in the process (they count in its RSS) until ``malloc_trim`` returns them, so the peak of a
  later phase would stack on the leftovers of an earlier one: ``release_memory()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import threading

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_FLAG_NAME = SCHEDULER_FLAG.split("=")[0]
_MIN_JAXLIB = (0, 6)  # has the flag (an unknown flag in XLA_FLAGS aborts the process)


def use_memory_scheduler() -> bool:
    """Adds ``SCHEDULER_FLAG`` to ``XLA_FLAGS`` unless set there already, opted out, or the jaxlib is
    older than ``_MIN_JAXLIB``. Returns whether the flag is in ``XLA_FLAGS`` now."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return SCHEDULER_FLAG in flags
    if os.environ.get("REMA_JAX_CPU_SCHEDULER", "memory") != "memory":
        return False
    try:
        from importlib.metadata import version

        if tuple(int(x) for x in version("jaxlib").split(".")[:2]) < _MIN_JAXLIB:
            return False
    except Exception:  # no jaxlib metadata (e.g. a source build): leave XLA's default
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
    return True


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, not macOS)
    except OSError:
        return None


def malloc_trim() -> bool:
    """Returns the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where unavailable."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


TRIM_MIN_COMPILE_S = 0.5  # a trim costs milliseconds; small compiles leave little to give back
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_trim_state = {"registered": False, "trims": 0}


def _trim_listener(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT and duration >= TRIM_MIN_COMPILE_S and malloc_trim():
        _trim_state["trims"] += 1


def trim_after_compiles() -> bool:
    """Registers (once) a jax.monitoring listener that calls ``malloc_trim`` after each backend compile
    of at least ``TRIM_MIN_COMPILE_S``. False when opted out (``REMA_JAX_TRIM_AFTER_COMPILE=0``) or
    without glibc's ``malloc_trim``."""
    if os.environ.get("REMA_JAX_TRIM_AFTER_COMPILE", "1") == "0" or _libc() is None:
        return False
    if not _trim_state["registered"]:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(_trim_listener)
        _trim_state["registered"] = True
    return True


def trims_after_compiles() -> int:
    """How many post-compile trims ran in this process."""
    return _trim_state["trims"]


def release_memory(*, clear_jax_caches: bool = True, collect_garbage: bool = True) -> bool:
    """Collects garbage (``collect_garbage``), optionally drops JAX's compiled-function caches (their
    executables and constants; the next call of a jitted function compiles again, or reads the
    persistent cache), and trims the C heap. Call it between stages or phases, never inside a jitted
    step. Returns ``malloc_trim()``'s.

    A full ``gc.collect()`` walks every tracked object (0.13-0.38 s in an RL trainer process). Within
    a training step nothing is left in reference cycles (measured at the trainer's two per-step calls:
    no unreachable object, on the default config and on the tests' tiny one): buffers die by reference
    count, so those calls only trim."""
    if collect_garbage:
        gc.collect()
    if clear_jax_caches:
        import jax  # here: importing this module stays cheap (the bootstrap validates configs first)

        jax.clear_caches()
    return malloc_trim()


def peak_rss_mib() -> float | None:
    """This process's peak resident set (``VmHWM``, MiB) since start or ``reset_peak_rss``; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restarts ``peak_rss_mib`` from the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """``with PeakRss() as span: ...`` -> ``span.mib``: the peak RSS (MiB) while the block ran; None
    off Linux.

    The kernel keeps one high-water mark per process (``VmHWM``), reset by ``reset_peak_rss``. A span
    resets it on entry; before that it hands the mark reached so far to the enclosing span, and on
    exit it hands its own peak up, so an enclosing span still sees the peak of everything inside it:

        outer.mib = max(HWM before the inner reset, inner.mib, HWM after the inner span).

    Spans nest per thread (a stack); the trainer's phases nest inside the bootstrap's stages this way.
    """

    _local = threading.local()

    def __init__(self):
        self.mib: float | None = None
        self._seen: float | None = None  # the largest mark handed up by inner spans

    @classmethod
    def _stack(cls) -> list["PeakRss"]:
        if not hasattr(cls._local, "stack"):
            cls._local.stack = []
        return cls._local.stack

    def _see(self, mib: float | None) -> None:
        if mib is not None:
            self._seen = mib if self._seen is None else max(self._seen, mib)

    def __enter__(self) -> "PeakRss":
        stack = self._stack()
        if stack:
            stack[-1]._see(peak_rss_mib())
        stack.append(self)
        reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        stack = self._stack()
        stack.pop()
        self._see(peak_rss_mib())
        self.mib = self._seen
        if stack:
            stack[-1]._see(self.mib)
