"""Persistent compilation cache (`rema_jax.compile_cache`): where it goes, the off switch, an
unwritable directory, a second process reading what the first wrote, and the entry points' flag.

The cache is process-wide jax state, so everything that compiles runs in a subprocess with its own
temporary directory; nothing here writes to ~/.cache (conftest gives the suite's
other subprocesses one temporary cache).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from rema_jax import compile_cache as cc

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ resolution (pure)
def test_default_dir_is_per_user(tmp_path, monkeypatch):
    assert cc.default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/rema_jax/xla"
    monkeypatch.setenv("HOME", str(tmp_path))  # expanduser reads the real environment
    expected = str(tmp_path / ".cache" / "rema_jax" / "xla")
    assert cc.default_cache_dir({}) == expected
    assert cc.resolve_cache_dir(None, {}) == expected


def test_resolution_order_argument_then_env_then_jax_env_then_default():
    env = {cc.ENV_VAR: "/from/rema", cc.JAX_ENV_VAR: "/from/jax", "XDG_CACHE_HOME": "/xdg"}
    assert cc.resolve_cache_dir("/explicit", env) == "/explicit"
    assert cc.resolve_cache_dir(None, env) == "/from/rema"
    assert cc.resolve_cache_dir(None, {cc.JAX_ENV_VAR: "/from/jax", "XDG_CACHE_HOME": "/xdg"}) == "/from/jax"
    assert cc.resolve_cache_dir(None, {"XDG_CACHE_HOME": "/xdg"}) == "/xdg/rema_jax/xla"
    assert cc.resolve_cache_dir("rel/dir", {}) == os.path.abspath("rel/dir")


@pytest.mark.parametrize("off", ["off", "OFF", " off ", "", "none", "false", "0"])
def test_off_disables_whichever_source_says_it(off):
    env = {"XDG_CACHE_HOME": "/xdg"}
    assert cc.resolve_cache_dir(off, env) is None
    assert cc.resolve_cache_dir(None, {**env, cc.ENV_VAR: off}) is None
    assert cc.resolve_cache_dir("/explicit", {**env, cc.ENV_VAR: off}) == "/explicit"  # the flag wins
    assert cc.resolve_cache_dir(off, {**env, cc.ENV_VAR: "/from/rema"}) is None


# ------------------------------------------------------------------ in this process (restored after)
@pytest.fixture
def fresh_module_state(monkeypatch):
    import jax

    before = {
        k: getattr(jax.config, k)
        for k in (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_enable_xla_caches",
        )
    }
    monkeypatch.setattr(cc, "_applied", cc._UNSET)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


def test_unwritable_directory_warns_and_runs_without_a_cache(tmp_path, fresh_module_state):
    import jax

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # root can write anywhere, but not below a file
    with pytest.warns(cc.CompilationCacheWarning, match="not writable"):
        assert cc.enable_compilation_cache(str(blocker / "xla")) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_enable_sets_jax_options_idempotently_and_off_clears_them(tmp_path, fresh_module_state):
    import jax

    d = str(tmp_path / "xla")
    assert cc.enable_compilation_cache(d) == d
    assert jax.config.jax_compilation_cache_dir == d
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cc.MIN_COMPILE_TIME_SECS
    assert cc.AUTOTUNE_FLAG in jax.config.jax_persistent_cache_enable_xla_caches
    assert (tmp_path / "xla" / cc.AUTOTUNE_FLAG).is_dir()
    assert cc.enable_compilation_cache(d) == d  # a second call changes nothing
    assert not [p for p in os.listdir(d) if p.startswith(".rema_write_probe_")]
    assert cc.enable_compilation_cache("off") is None
    assert jax.config.jax_compilation_cache_dir is None


# ------------------------------------------------------------------ across processes
_COMPILE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from rema_jax.compile_cache import enable_compilation_cache
    events = {}
    jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
    used = enable_compilation_cache(sys.argv[1], min_compile_time_secs=0.0)

    @jax.jit
    def f(x):
        for _ in range(8):
            x = jnp.tanh(x @ x.T + 1.0)
        return x.sum()

    f(jnp.ones((16, 16))).block_until_ready()
    print(json.dumps({"dir": used, "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                      "writes": events.get("/jax/compilation_cache/cache_misses", 0)}))
""")


def _run_python(code: str, *args: str, env_extra=None) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", cc.ENV_VAR))
    }
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}, **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(d) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in pathlib.Path(d).glob("*-cache")}


def test_second_process_reads_what_the_first_wrote(tmp_path):
    d = str(tmp_path / "xla")
    first = _run_python(_COMPILE, d)  # f, and the small programs behind jnp.ones etc.
    assert first["dir"] == d and first["hits"] == 0 and first["writes"] >= 1
    written = _entries(d)
    assert len(written) == first["writes"]
    second = _run_python(_COMPILE, d)
    assert second == {"dir": d, "hits": first["writes"], "writes": 0}
    assert _entries(d) == written  # read, not rewritten
    off = _run_python(_COMPILE, "off")
    assert off == {"dir": None, "hits": 0, "writes": 0}


_CLI = textwrap.dedent("""
    import json
    from rema_jax.cli import run_main

    def main(argv):
        import jax
        from jax._src import xla_bridge
        print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                          "min_compile_s": jax.config.jax_persistent_cache_min_compile_time_secs,
                          "backend_started": xla_bridge.backends_are_initialized()}))

    run_main(main)
""")


def test_entry_points_apply_the_flag_before_main_without_starting_a_backend(tmp_path):
    d, from_env = str(tmp_path / "flag"), str(tmp_path / "env")
    assert _run_python(_CLI, f"--compilation_cache={d}") == {
        "dir": d,
        "min_compile_s": cc.MIN_COMPILE_TIME_SECS,
        "backend_started": False,
    }
    assert _run_python(_CLI, env_extra={cc.ENV_VAR: from_env})["dir"] == from_env
    assert _run_python(_CLI, f"--compilation_cache={d}", env_extra={cc.ENV_VAR: from_env})["dir"] == d
    assert _run_python(_CLI, "--compilation_cache=off", env_extra={cc.ENV_VAR: from_env})["dir"] is None
    home = tmp_path / "home"
    default = _run_python(_CLI, env_extra={"XDG_CACHE_HOME": str(home)})  # no flag, no variable
    assert default["dir"] == str(home / "rema_jax" / "xla") and (home / "rema_jax" / "xla").is_dir()
