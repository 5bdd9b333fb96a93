"""The shared layer module (`rema_jax.models.layers`): one attention / mask / KV-cache layout for the
training forward and the sampler, and no import loop between the model and sampling modules."""

import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.models import layers
from rema_jax.models.testing import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rema_jax.models", "rema_jax.sampling")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        d = REPO / pkg.replace(".", "/")
        for f in sorted(d.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> modules of the two packages it imports, at any level (function-local imports too)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.stem == "__init__" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_models_and_sampling_import_graph_has_no_cycle():
    graph = import_graph()
    # package __init__ files re-export their submodules; a submodule importing its own package's
    # __init__ is how Python resolves `from pkg import sub`, not a loop between implementations
    graph = {m: {n for n in deps if n not in PACKAGES} for m, deps in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the layer module sits below both the model and the sampler
    assert graph["rema_jax.models.layers"] <= {"rema_jax.models.config", "rema_jax.models.rope"}
    assert "rema_jax.models.layers" in graph["rema_jax.models.transformer"]
    assert "rema_jax.models.layers" in graph["rema_jax.sampling.kernel"]
    assert "rema_jax.models.transformer" not in graph["rema_jax.sampling.kernel"]
    assert "rema_jax.models.transformer" not in graph["rema_jax.models.adapters"]


def test_cycle_finder_sees_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "module",
    [
        "rema_jax.models.layers",
        "rema_jax.models.adapters",
        "rema_jax.models.transformer",
        "rema_jax.models.hf_loader",
        "rema_jax.sampling.kernel",
        "rema_jax.sampling.sampler",
        "rema_jax.sharding.memory",
    ],
)
def test_module_imports_first_in_a_fresh_interpreter(module):
    """Each module of the former adapters <-> transformer loop (and its users) imports on its own."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------ layer math
def test_masked_keys_get_exactly_zero_probability_and_pad_rows_stay_finite():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 3, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 3, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 3, 2, 8)), jnp.float32)
    mask = jnp.asarray([[[False, False, False], [False, True, False], [False, True, True]]])  # row 0: a pad query
    out = np.asarray(layers.dot_product_attention(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 1], np.repeat(np.asarray(v)[0, 1], 2, axis=0))  # one key: its value
    # a changed masked key/value changes nothing
    k2, v2 = k.at[:, 0].set(100.0), v.at[:, 0].set(-100.0)
    np.testing.assert_array_equal(np.asarray(layers.dot_product_attention(q, k2, v2, mask))[0, 1:], out[0, 1:])


def test_decode_attention_matches_block_attention_in_the_cache_layout():
    rng = np.random.default_rng(1)
    b, s, h, kv, d = 2, 6, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    mask_bs = jnp.asarray([[True] * 6, [False, False, True, True, True, False]])
    block = layers.dot_product_attention(q, k, v, mask_bs[:, None, :])[:, 0]
    cache = layers.kv_cache_from_block(k, v, s + 2)
    mask_bc = jnp.concatenate([mask_bs, jnp.zeros((b, 2), bool)], axis=1)
    np.testing.assert_allclose(layers.decode_attention(q[:, 0], cache, mask_bc), block, atol=1e-6)


def test_kv_cache_layout_and_write():
    cfg = tiny_config()
    b, t, c = 2, 3, 8
    k = jnp.arange(b * t * cfg.num_kv_heads * cfg.head_dim, dtype=jnp.float32).reshape(b, t, cfg.num_kv_heads, -1)
    cache = layers.kv_cache_from_block(k, -k, c)
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    assert layers.kv_cache_shapes(cfg, b, c) == ((b, kv, hd, c), (b, kv, c, hd))
    assert (cache.k.shape, cache.v.shape) == layers.kv_cache_shapes(cfg, b, c)
    np.testing.assert_array_equal(cache.k[..., :t], np.asarray(k).transpose(0, 2, 3, 1))  # keys: [B, kv, hd, C]
    np.testing.assert_array_equal(cache.v[:, :, :t], -np.asarray(k).transpose(0, 2, 1, 3))  # values: [B, kv, C, hd]
    assert not np.asarray(cache.k[..., t:]).any() and not np.asarray(cache.v[:, :, t:]).any()
    new = k[:, :1] + 1000
    cache = layers.kv_cache_write(cache, new, -new, jnp.int32(5))
    np.testing.assert_array_equal(cache.k[..., 5], np.asarray(new)[:, 0])
    np.testing.assert_array_equal(cache.v[:, :, 5], -np.asarray(new)[:, 0])
    np.testing.assert_array_equal(cache.k[..., :t], np.asarray(k).transpose(0, 2, 3, 1))  # untouched
    zeros = layers.init_kv_cache(cfg, b, c)
    assert len(zeros) == cfg.num_layers and zeros[0].k.dtype == layers.kv_cache_dtype(cfg)
    assert (zeros[0].k.shape, zeros[0].v.shape) == layers.kv_cache_shapes(cfg, b, c)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_keeps_dtype(dtype):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5)), dtype)
    y = layers.rms_norm(x, jnp.ones((5,), jnp.float32), 1e-6)
    assert y.dtype == x.dtype
    x32 = np.asarray(x, np.float32)
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + 1e-6),
        rtol=1e-2 if dtype == "bfloat16" else 1e-5,
    )
    np.testing.assert_allclose(layers.mlp_hidden(x, x), jax.nn.silu(x) * x)
