"""Persistent XLA compilation cache, on by default for the entry points (``launch/*.py``).

    from rema_jax.compile_cache import enable_compilation_cache
    enable_compilation_cache()              # $REMA_JAX_COMPILATION_CACHE or ~/.cache/rema_jax/xla
    enable_compilation_cache("/tmp/xla")    # an explicit directory
    enable_compilation_cache("off")         # no persistent cache

Compiled executables (sampler prefill/decode, the update step, ...) are written to the directory and
read back by the next run with the same program, shapes, devices and jax/jaxlib version, so a
second identical run skips most of its compilation. The directory resolves as: the explicit
argument > ``$REMA_JAX_COMPILATION_CACHE`` > ``$JAX_COMPILATION_CACHE_DIR`` (jax's own variable) >
``$XDG_CACHE_HOME/rema_jax/xla`` > ``~/.cache/rema_jax/xla``. ``off`` (or ``none``, ``false``,
``0``, empty) disables it.

Only executables that took at least ``min_compile_time_secs`` (0.5 s; jax's default is 1 s) to
compile are written, so the many tiny jitted helpers do not fill the directory. jax's minimum entry
size is left at its default. On GPU, XLA's per-fusion autotuning results are cached too, in
``<dir>/xla_gpu_per_fusion_autotune_cache_dir`` (jax passes
``xla_gpu_per_fusion_autotune_cache_dir`` with every compile when
``jax_persistent_cache_enable_xla_caches`` names it, as it does by default in jax 0.10; only
process 0 writes it). A jax without that option gets the XLA flag through ``XLA_FLAGS`` instead,
which XLA reads once when the backend starts, so it is added only while no backend is running.

Call it before the first device use (before any ``jax.devices()``, array or compile): it never
touches a device itself, so it may also run before ``jax.distributed.initialize``. A later call
switches the directory for the compiles that follow. It never raises: a directory that cannot be
created or written is a `CompilationCacheWarning` and no cache.
"""

from __future__ import annotations

import os
import tempfile
import warnings

ENV_VAR = "REMA_JAX_COMPILATION_CACHE"
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
OFF_VALUES = ("off", "none", "false", "0", "")
MIN_COMPILE_TIME_SECS = 0.5
AUTOTUNE_FLAG = "xla_gpu_per_fusion_autotune_cache_dir"  # also the subdirectory name jax uses

_UNSET = object()
_applied: object = _UNSET  # the directory (or None) the last call configured


class CompilationCacheWarning(UserWarning):
    """The persistent compilation cache could not be set up; the run continues without it."""


def default_cache_dir(environ=None) -> str:
    """``$XDG_CACHE_HOME/rema_jax/xla``, else ``~/.cache/rema_jax/xla``."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rema_jax", "xla")


def is_off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in OFF_VALUES


def resolve_cache_dir(directory: str | None = None, environ=None) -> str | None:
    """The cache directory to use (absolute, ``~`` expanded), or None when it is switched off."""
    environ = os.environ if environ is None else environ
    for value in (directory, environ.get(ENV_VAR), environ.get(JAX_ENV_VAR)):
        if value is not None:
            break
    else:
        value = default_cache_dir(environ)
    if is_off(value):
        return None
    return os.path.abspath(os.path.expanduser(value.strip()))


def _check_writable(path: str) -> str | None:
    """None if ``path`` can be created and written, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".rema_write_probe_"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def _configure_jax(path: str | None, min_compile_time_secs: float) -> None:
    import jax
    from jax._src import compilation_cache as jax_cc  # private: only to drop an initialised cache

    def drop_open_cache():  # a cache opened by an earlier compile keeps its old path otherwise
        if getattr(jax_cc, "_cache", None) is not None:
            jax_cc.reset_cache()

    jax.config.update("jax_compilation_cache_dir", path)  # None: off (also over $JAX_COMPILATION_CACHE_DIR)
    if path is None:
        drop_open_cache()
        return
    jax.config.update("jax_enable_compilation_cache", True)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    drop_open_cache()

    os.makedirs(os.path.join(path, AUTOTUNE_FLAG), exist_ok=True)  # XLA wants it to exist
    if hasattr(jax.config, "jax_persistent_cache_enable_xla_caches"):  # jax >= 0.4.31
        enabled = jax.config.jax_persistent_cache_enable_xla_caches or ""
        if enabled != "all" and AUTOTUNE_FLAG not in enabled:
            jax.config.update(
                "jax_persistent_cache_enable_xla_caches", ",".join(x for x in (enabled, AUTOTUNE_FLAG) if x)
            )
        return
    from jax._src import xla_bridge

    xla_flags = os.environ.get("XLA_FLAGS", "")
    if AUTOTUNE_FLAG in xla_flags:
        return
    if xla_bridge.backends_are_initialized():
        warnings.warn(
            "the XLA backend is already running: GPU autotuning results are not cached "
            "(call enable_compilation_cache before the first device use)",
            CompilationCacheWarning,
            stacklevel=3,
        )
        return
    os.environ["XLA_FLAGS"] = f"{xla_flags} --{AUTOTUNE_FLAG}={os.path.join(path, AUTOTUNE_FLAG)}".strip()


def enable_compilation_cache(
    directory: str | None = None, *, min_compile_time_secs: float = MIN_COMPILE_TIME_SECS
) -> str | None:
    """Points jax's persistent compilation cache at ``directory`` (resolved as the module says).

    Returns the directory in use, or None when the cache is off or could not be set up (then a
    `CompilationCacheWarning` says why). Idempotent; never raises; never touches a device.
    """
    global _applied
    try:
        path = resolve_cache_dir(directory)
        if path == _applied:
            return path
        if path is not None:
            problem = _check_writable(path)
            if problem is not None:
                warnings.warn(
                    f"compilation cache {path!r} is not writable ({problem}); running without "
                    f"a persistent compilation cache (set --compilation_cache or ${ENV_VAR})",
                    CompilationCacheWarning,
                    stacklevel=2,
                )
                path = None
        _configure_jax(path, min_compile_time_secs)
        _applied = path
        return path
    except Exception as e:  # noqa: BLE001 -- a cache problem must never stop a run
        warnings.warn(
            f"could not set up the compilation cache ({type(e).__name__}: {e}); running without it",
            CompilationCacheWarning,
            stacklevel=2,
        )
        try:
            import jax

            jax.config.update("jax_compilation_cache_dir", None)
        except Exception:  # noqa: BLE001
            pass
        _applied = None
        return None
