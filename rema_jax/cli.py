"""Shared command-line plumbing for ``launch/*.py``: one way to report user errors, typed overrides.

    if __name__ == "__main__":
        run_main(main)                   # absl entry points (app.run)
        run_main(main, use_absl=False)   # plain ones: main() returns the exit code

A `rema_jax.errors.UserError` (bad config, record, checkpoint, model source, ...) or a missing input
file is printed as one ``error: <message>`` line on stderr with exit code 2; any other exception
propagates with its traceback.

Every absl entry point also gets ``--compilation_cache=DIR|off``: the persistent XLA compilation cache
(`rema_jax.compile_cache`), switched on in `run_main` after flag parsing and before ``main`` runs, so
before any device use (and before ``jax.distributed`` is initialised; enabling it touches no device).
Default: ``$REMA_JAX_COMPILATION_CACHE``, else ``~/.cache/rema_jax/xla``. A plain (argparse) entry
point adds `COMPILATION_CACHE_HELP`'s flag itself and calls `enable_compilation_cache` first thing.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

from rema_jax.errors import UserError

EXIT_USER_ERROR = 2
_USER_ERRORS = (UserError, FileNotFoundError)


def _guard(main: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except _USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return guarded


def _unknown_field(error: BaseException) -> str:
    """ml_collections' "no such field" error as ``'name' is unknown[. Did you mean ...]``."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
        error = error.args[0]
    first, *hints = (str(error.args[0]) if error.args else "").splitlines() or [""]
    name = first.strip("'\"")
    return (name if " " in name else f"{name!r} is unknown") + "".join(f". {h.strip()}" for h in hints if h.strip())


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports bad flags, ``--config.*`` keys and config files in one line."""
    from absl import flags
    from ml_collections.config_flags.config_flags import is_config_flag

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        message = f"{e} (see --helpshort)"
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.x.y override names no field
        detail = _unknown_field(e)
        unknown = detail.split("'")[1] if detail.count("'") >= 2 else None
        bad = [a for a in argv[1:] if a.startswith("-") and unknown in a.split("=", 1)[0].split(".")[1:]]
        message = f"{bad[-1] if bad else 'a --config.* override'}: the config has no such field ({detail})"
    else:
        for name in list(flags.FLAGS):
            if not is_config_flag(flags.FLAGS[name]):
                continue
            try:
                getattr(flags.FLAGS[name].value, "keys", None)  # ml_collections defers load errors
            except OSError as e:
                message = f"--{name}: cannot load the config file ({str(e).strip().splitlines()[-1].strip()})"
                break
        else:
            return rest
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


COMPILATION_CACHE_HELP = (
    "Persistent XLA compilation cache directory, or 'off'. Default: $REMA_JAX_COMPILATION_CACHE, "
    "else $XDG_CACHE_HOME/rema_jax/xla (~/.cache/rema_jax/xla). A second identical run reuses the "
    "compiled programs (and, on GPU, the autotuning results)."
)


def _define_common_flags() -> None:
    from absl import flags

    if "compilation_cache" not in flags.FLAGS:
        flags.DEFINE_string("compilation_cache", None, COMPILATION_CACHE_HELP)


def _with_compilation_cache(main: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        from absl import flags

        from rema_jax.compile_cache import enable_compilation_cache

        enable_compilation_cache(flags.FLAGS.compilation_cache)  # never raises, touches no device
        return main(*args, **kwargs)

    return wrapped


def run_main(main: Callable[..., Any], *, use_absl: bool = True) -> None:
    """Runs an entry point's ``main`` (via absl's ``app.run`` or called bare) and exits.

    With absl, ``--compilation_cache`` is defined here and applied before ``main`` runs.
    """
    if use_absl:
        from absl import app

        _define_common_flags()
        app.run(_guard(_with_compilation_cache(main)), flags_parser=_parse_flags)
    else:
        sys.exit(_guard(main)())


def apply_overrides(config, overrides: Sequence[str], flag: str = "override"):
    """Applies ``key=value`` items to an ``ml_collections.ConfigDict`` in place (also returned).

    Each value is parsed by the type of the existing field, exactly as ``--config.key=value`` is for
    ``launch/train.py`` (the same ml_collections/absl parsers): strings stay strings, ``true``/``false``
    are bools, ints and floats are checked, a tuple is a Python literal (``'(a, b)'``) or the key
    repeated. A wrong key or value raises `ConfigError` naming ``--<flag>=<item>``.
    """
    from absl import flags
    from ml_collections import config_flags

    from rema_jax.config_utils import ConfigError

    groups: dict[str, list[str]] = {}  # key → its items; a repeated key builds a tuple
    for item in overrides:
        key = item.partition("=")[0]
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--{flag}={item}: expected key=value with a dotted config key, e.g. loop.seed=1")
        groups.setdefault(key, []).append(item)
    for key, items in groups.items():
        argv = [flag] + [f"--config.{item}" for item in items]
        values = flags.FlagValues()
        try:
            config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=False, sys_argv=argv)
            values(argv)
        except (AttributeError, KeyError) as e:  # ConfigDict: no such field (with a "Did you mean")
            raise ConfigError(f"--{flag}={items[-1]}: the config has no field {key!r} ({_unknown_field(e)})") from None
        except (flags.Error, ValueError, TypeError) as e:
            raise ConfigError(f"--{flag}={items[-1]}: {e}") from None
    return config
