"""The matmul floor of one decode step on this CPU: XLA (jax) vs PyTorch, same shapes, same run.

A decode step of SmolLM2-135M multiplies each row's hidden state by every weight once: per layer the
fused q/k/v `[576, 960]`, `o_proj [576, 576]`, the fused gate/up `[576, 3072]` and `down [1536, 576]`,
then the tied LM head `[576, 49152]`: 269 MFLOP per row. Everything else (norms, rotary, attention
over <= 384 cached keys, sampling) is < 3% of the FLOPs. This script times exactly those matmuls, one
decode step's worth, as one jitted XLA program and as the same `torch.matmul` calls (fp32, the
machine's threads), at the sampler benchmark's batch sizes.

Why: `benchmarks/sampler.py` compares the whole samplers. When the two libraries' matmuls alone run
at a ratio r, a sampler ratio above r can only come from the other side's overheads (Python per op,
eager dispatch), which shrink as the batch grows. So this bounds what the jitted sampler can reach at
batch 32, where the step is compute-bound.

    python benchmarks/decode_matmul.py                 # batch 1, 8, 32
    python benchmarks/decode_matmul.py --batches 32 64 --repeats 20

Prints GFLOP/s per side and the ratio torch time / XLA time per batch, the CPU model, and one JSON
last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.update_memory import _cpu_model as cpu_model  # noqa: E402

HIDDEN, INTER, KV_OUT, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
LAYER_SHAPES = [(HIDDEN, HIDDEN + 2 * KV_OUT), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]


def flops_per_row() -> int:
    return 2 * (LAYERS * sum(a * b for a, b in LAYER_SHAPES) + HIDDEN * VOCAB)


def _weights(rng, np):
    layers = [[rng.standard_normal(s, dtype=np.float32) * 0.02 for s in LAYER_SHAPES] for _ in range(LAYERS)]
    return layers, rng.standard_normal((HIDDEN, VOCAB), dtype=np.float32) * 0.02


def _step_inputs(batch, rng, np):
    """One input per matmul, so neither side can chain or skip work: `[B, in]` each."""
    return [rng.standard_normal((batch, a), dtype=np.float32) for a, _ in LAYER_SHAPES]


def time_xla(layers, head, xs, repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def step(layers, head, xs):
        out = []
        for w4 in layers:
            out += [jnp.sum(x @ w) for x, w in zip(xs, w4)]  # reduce: the outputs stay live, tiny to return
        return jnp.stack(out).sum() + jnp.sum(xs[0] @ head)

    args = jax.device_put((layers, head, xs))
    step(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def time_torch(layers, head, xs, repeats: int) -> list[float]:
    import torch

    tl = [[torch.from_numpy(w) for w in w4] for w4 in layers]
    th, tx = torch.from_numpy(head), [torch.from_numpy(x) for x in xs]

    def step():
        with torch.inference_mode():
            s = 0.0
            for w4 in tl:
                for x, w in zip(tx, w4):
                    s += float(torch.matmul(x, w).sum())
            return s + float(torch.matmul(tx[0], th).sum())

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    layers, head = _weights(rng, np)
    machine = cpu_model()
    print(f"decode-step matmuls of SmolLM2-135M (fp32, {flops_per_row() / 1e6:.0f} MFLOP/row); CPU: {machine}")
    print(f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'batch':>6}{'XLA ms':>10}{'torch ms':>10}{'XLA GFLOP/s':>13}{'torch GFLOP/s':>15}{'torch/XLA':>11}")
    rows = []
    for b in args.batches:
        xs = _step_inputs(b, rng, np)
        tx = statistics.median(time_xla(layers, head, xs, args.repeats))
        tt = statistics.median(time_torch(layers, head, xs, args.repeats))
        gf = flops_per_row() * b / 1e9
        rows.append(
            {"batch": b, "xla_s": tx, "torch_s": tt, "xla_gflops": gf / tx, "torch_gflops": gf / tt, "ratio": tt / tx}
        )
        print(f"{b:>6}{tx * 1e3:>10.1f}{tt * 1e3:>10.1f}{gf / tx:>13.1f}{gf / tt:>15.1f}{tt / tx:>11.2f}")
    print(
        "(ratio > 1: XLA's matmuls are faster; the sampler's ratio at a compute-bound batch cannot exceed it by much)"
    )
    print(
        json.dumps({"benchmark": "decode_matmul", "cpu": machine, "mflop_per_row": flops_per_row() / 1e6, "rows": rows})
    )


if __name__ == "__main__":
    main()
