"""benchmarks/decode_matmul.py: its FLOP count matches SmolLM2's projection weights, and (slow) the
script runs both sides and prints its JSON line."""

import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_per_row_are_two_per_projection_weight_of_smollm2():
    from benchmarks.update_memory import SMOLLM2
    from rema_jax.models.testing import tiny_config
    from rema_jax.models.transformer import param_shapes

    shapes = param_shapes(tiny_config(**SMOLLM2))
    kernels = [np.prod(leaf) for leaf in _leaves(shapes) if len(leaf) == 2]  # kernels and the embedding
    from benchmarks.decode_matmul import flops_per_row

    assert flops_per_row() == 2 * sum(kernels)  # the tied embedding is the LM head


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


@pytest.mark.slow
def test_the_script_prints_both_sides(benchmark_json):
    out, _ = benchmark_json("benchmarks/decode_matmul.py", "--batches", "1", "--repeats", "1")
    assert out["rows"][0]["batch"] == 1 and out["rows"][0]["ratio"] > 0 and out["cpu"]
