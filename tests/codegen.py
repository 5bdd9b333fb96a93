"""The XLA:CPU code generation the test session compiles with (applied by conftest.py before JAX starts).

The suite is dominated by compiling small programs (a tiny model's sampler, update and log-prob passes,
rebuilt by every trainer a test makes), and most of an XLA:CPU compile is LLVM optimising the emitted
code. ``--xla_backend_optimization_level=0`` skips that: the same HLO programs (XLA's own fusion and
layout passes still run, and matmuls still call the same library kernels), less optimised loops around
them. On 2 AMD EPYC cores the whole suite took 596 s instead of 825 s in back-to-back runs (2026-12-06),
and every test passed either way except the bit-exact golden comparison, which keeps one recording per
code generation (tests/golden/, ``test_golden_metrics.fingerprint``).

``REMA_JAX_TEST_CODEGEN=default`` runs the suite with XLA's default code generation (what training runs
use); an optimisation level already in ``XLA_FLAGS`` is kept as it is.
"""

import os

LEVEL_FLAG = "--xla_backend_optimization_level"
FAST = f"{LEVEL_FLAG}=0"


def apply() -> None:
    """Adds ``FAST`` to ``XLA_FLAGS`` unless ``REMA_JAX_TEST_CODEGEN=default`` or a level is set already.
    Takes effect only before the XLA backend starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("REMA_JAX_TEST_CODEGEN", "fast") == "default" or LEVEL_FLAG in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FAST}".strip()


def flags() -> list[str]:
    """The code-generation flags of this session's ``XLA_FLAGS``, for a subprocess that sets its own."""
    return [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(LEVEL_FLAG)]


def name() -> str:
    """``"O<level>"`` as set in ``XLA_FLAGS``, else ``"default"``."""
    found = flags()
    return f"O{found[-1].split('=', 1)[1]}" if found else "default"
