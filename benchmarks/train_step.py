"""RL update-step throughput and model-FLOP utilisation (MFU) against this machine's measured matmul peak.

The step is the real one: `rema_jax.rl.make_update_fn` (turn-level PPO loss + AdamW, one mini-batch),
run under a mesh over all local devices with the `rema_jax.sharding` layout (`shard_update_fn`), on
random weights of a real model's shape. Two modes: `lora` (rank 16 on all 7 projections, base frozen
and passed as a sharded constant) and `full` (the whole tree trained).

Model FLOPs per step (tokens = batch x seq; N = matmul weights incl. the LM head, embedding gather
excluded; attention = 12 * layers * heads * head_dim * seq per token, PaLM appendix B, full T x T
as our attention computes it):
  full: 6 * N * tokens + attention
  lora: 4 * N * tokens + 6 * N_lora * tokens + attention
        (forward 2N, backward through the frozen weights for the activation gradients 2N, no
        weight gradients for them; the LoRA factors cost forward + both backward products.)
The peak is measured in the same run: a large jitted matmul in the step's compute dtype.
The modes' steps are compiled first and then timed interleaved (lora, full, lora, full, ...; median of
`--steps`), so a machine shared with other jobs loads both alike; each step's process CPU seconds are
reported too. The compiled executables' FLOPs (XLA `cost_analysis`, independent of load) and the
per-token LoRA speedup over full fine-tuning (`lora_speedup_per_token`) are printed with the CPU model.

On a GPU (when one is lent) the defaults become bf16 and Qwen2.5-0.5B / 1.5B shapes, and decode
tokens/s of the `Sampler` is reported against the HBM-bandwidth roofline (measured copy bandwidth;
one decode step must read every weight and the KV cache).

    python benchmarks/train_step.py --quick          # CPU: SmolLM2-135M, lora + full, tiny batch
    python benchmarks/train_step.py                  # CPU: batch 4 x 256, 3 timed steps
    python benchmarks/train_step.py --model qwen2.5-0.5b --dtype bfloat16 --batch 16 --seq 1024   # GPU
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

MODELS = {  # random weights of these shapes (real weights cannot travel to a lent GPU)
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1000000.0,
        family="qwen2",
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1000000.0,
        family="qwen2",
    ),
}


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in `dtype` (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a jitted elementwise pass over a `nbytes` array (reads + writes it)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def matmul_params(cfg, lora_rank: int = 0) -> tuple[int, int]:
    """(N matmul weights incl. LM head, N LoRA factors for rank `lora_rank` on all 7 projections)."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f
    lora_layer = lora_rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    return cfg.num_layers * per_layer + h * cfg.vocab_size, cfg.num_layers * lora_layer


def model_flops(cfg, mode: str, batch: int, seq: int, lora_rank: int) -> float:
    n, n_lora = matmul_params(cfg, lora_rank)
    tokens = batch * seq
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * tokens
    if mode == "full":
        return 6 * n * tokens + attention
    return 4 * n * tokens + 6 * n_lora * tokens + attention


def _batch(cfg, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32)
    loss = np.ones((batch, seq), np.float32)
    loss[:, : seq // 4] = 0.0  # the prompt part
    return {
        "tokens": tokens,
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": loss,
        "turn_ids": np.where(loss > 0, 0, -1).astype(np.int32),
        "advantages": (rng.standard_normal((batch, 1)) * loss).astype(np.float32),
        "old_logprobs": (-2.0 * loss).astype(np.float32),
    }


def build_update(cfg, mode: str, args, plan) -> dict:
    """Compile one mode's update step; returns its callable, inputs and the executable's FLOPs."""
    import jax

    from rema_jax.models import forward
    from rema_jax.models.adapters import AdapterConfig, init_adapter
    from rema_jax.models.testing import random_params
    from rema_jax.rl import LossConfig, MultiAgentOptimizer, OptimizerConfig, init_rl_state, make_update_fn
    from rema_jax.sharding import shard_update_fn

    params = plan.put(random_params(cfg, jax.random.key(0), std=0.02))
    opt = MultiAgentOptimizer(OptimizerConfig(learning_rate=1e-6))
    loss_cfg = LossConfig(max_turns=1, logprob_chunk_size=args.logprob_chunk)
    if mode == "lora":
        adapter = init_adapter(
            cfg, params, AdapterConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), jax.random.key(1)
        )
        state, consts, trained = init_rl_state({"reasoning": adapter}, opt), {"base": params}, ("reasoning",)

        def logits_fn(p, role, b):
            return forward(cfg, p["base"], b.tokens, p["reasoning"], attention_mask=b.attention_mask)
    else:
        state, consts, trained = init_rl_state({"shared": params}, opt), {}, ("shared",)

        def logits_fn(p, role, b):
            return forward(cfg, p["shared"], b.tokens, attention_mask=b.attention_mask)

    state, consts = plan.put(state), plan.put(consts)
    host = {"reasoning": _batch(cfg, args.batch, args.seq)}
    shardings = plan.batch_shardings(host)
    batches = jax.tree.map(lambda x, s: jax.device_put(x, s), host, shardings)
    step = shard_update_fn(
        make_update_fn(logits_fn, loss_cfg, opt), plan, state, batches, trained, consts, donate_state=True
    )
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, batches, consts).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {
        "mode": mode,
        "step": compiled,
        "state": state,
        "batches": batches,
        "consts": consts,
        "compile_s": compile_s,
        "hlo_flops": float(cost.get("flops", 0.0)),
        "times": [],
        "cpu": [],
    }


def time_step(run: dict) -> None:
    """One timed step (wall and process CPU seconds); the donated state is replaced by the new one."""
    import jax

    c0, t0 = time.process_time(), time.perf_counter()
    run["state"], run["metrics"] = run["step"](run["state"], run["batches"], run["consts"])
    jax.block_until_ready(run["state"])
    run["times"].append(time.perf_counter() - t0)
    run["cpu"].append(time.process_time() - c0)


def update_result(cfg, run: dict, args) -> dict:
    import numpy as np

    tokens = args.batch * args.seq
    sec = statistics.median(run["times"])
    flops = model_flops(cfg, run["mode"], args.batch, args.seq, args.lora_rank)
    return {
        "mode": run["mode"],
        "step_s": sec,
        "step_s_all": run["times"],
        "cpu_s": statistics.median(run["cpu"]),
        "compile_s": run["compile_s"],
        "tokens_per_s": tokens / sec,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / sec / 1e12,
        "hlo_tflops_per_step": run["hlo_flops"] / 1e12,
        "hlo_mflops_per_token": run["hlo_flops"] / tokens / 1e6,
        "loss_finite": bool(np.isfinite(float(run["metrics"]["loss"]))),
    }


def cpu_model() -> str:
    """lscpu's 'Model name' (falls back to /proc/cpuinfo, then platform)."""
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_decode(cfg, args, plan, hbm_bw: float) -> dict:
    """Sampler decode tokens/s vs the HBM roofline batch * bw / (weight bytes + mean KV bytes)."""
    import jax
    import numpy as np

    from rema_jax.models.testing import random_params
    from rema_jax.sampling import Sampler, SamplingParams

    class Tok:
        eos_token_id = cfg.eos_token_id

        def decode(self, ids):
            return ""

    params = plan.put(random_params(cfg, jax.random.key(0), std=0.02))
    b, prompt, new = args.decode_batch, 128, args.decode_tokens
    sampler = Sampler(cfg, Tok(), max_cache_len=prompt + new, batch_buckets=(b,))
    rows = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, prompt)).tolist()
    sp = SamplingParams(max_new_tokens=new, greedy=True, ignore_eos=True)
    sampler.generate(params, None, rows, sp)
    t0 = time.perf_counter()
    sampler.generate(params, None, rows, sp)
    sec = time.perf_counter() - t0
    item = jax.numpy.dtype(cfg.compute_dtype).itemsize
    n, _ = matmul_params(cfg)
    kv_mean = 2 * cfg.num_layers * b * (prompt + new / 2) * cfg.num_kv_heads * cfg.head_dim * item
    roofline = b * hbm_bw / (n * item + kv_mean)
    tps = b * new / sec  # includes the prefill of 128 tokens per row
    return {
        "decode_batch": b,
        "decode_tokens_per_s": tps,
        "decode_roofline_tokens_per_s": roofline,
        "decode_fraction_of_roofline": tps / roofline,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (interleaved across modes)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--logprob-chunk", type=int, default=None)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--decode", action="store_true", help="also measure Sampler decode (default on GPU/TPU)")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="tiny batch, 1 timed step (smoke run)")
    args = p.parse_args()

    import jax

    from rema_jax.models.config import ModelConfig
    from rema_jax.sharding import MeshConfig, ShardingPlan, check_fits, device_memory_bytes, make_mesh, plan_memory

    backend = jax.default_backend()
    accel = backend in ("gpu", "tpu")
    args.model = args.model or ("qwen2.5-0.5b" if accel else "smollm2-135m")
    args.dtype = args.dtype or ("bfloat16" if accel else "float32")
    args.batch = args.batch or (16 if accel else (2 if args.quick else 4))
    args.seq = args.seq or (1024 if accel else (64 if args.quick else 256))
    if args.quick:
        args.steps = 1
        args.decode_tokens = min(args.decode_tokens, 32)
    args.decode = args.decode or accel

    cfg = ModelConfig(**MODELS[args.model], dtype=args.dtype, param_dtype=args.dtype, max_position_embeddings=4096)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=args.fsdp, tensor=args.tensor))
    plan = ShardingPlan(mesh, cfg)
    modes = [m for m in args.modes.split(",") if m]
    mem = device_memory_bytes()
    for mode in modes:
        mp = plan_memory(
            cfg,
            mesh,
            adapter_kind="lora" if mode == "lora" else "shared",
            lora_rank=args.lora_rank,
            num_agents=1,
            train_batch=args.batch,
            train_seq=args.seq,
            rollout_batch=args.decode_batch if args.decode else 1,
            cache_len=128 + args.decode_tokens,
            fused_copies=1 if args.decode else 0,
        )
        print(f"[{mode}]\n{mp.table(mem)}", flush=True)
        check_fits(mp, mem)

    peak_n = 8192 if accel else (1024 if args.quick else 2048)
    peak = matmul_peak(jax.numpy.dtype(args.dtype), peak_n)
    n, n_lora = matmul_params(cfg, args.lora_rank)
    cpu = cpu_model()
    print(
        f"cpu={cpu!r} backend={backend} devices={jax.device_count()} model={args.model} dtype={args.dtype} "
        f"N_matmul={n / 1e6:.1f}M N_lora={n_lora / 1e6:.2f}M peak={peak / 1e12:.3f} TFLOP/s",
        flush=True,
    )
    runs = []
    for mode in modes:
        run = build_update(cfg, mode, args, plan)
        time_step(run)  # warm-up, untimed
        run["times"], run["cpu"] = [], []
        print(f"[{mode}] compiled in {run['compile_s']:.1f}s  HLO {run['hlo_flops'] / 1e12:.3f} TFLOP/step", flush=True)
        runs.append(run)
    for _ in range(args.steps):  # interleaved, so shared-machine load hits every mode alike
        for run in runs:
            time_step(run)
    results = []
    for run in runs:
        r = update_result(cfg, run, args)
        r["mfu"] = r["achieved_tflops"] * 1e12 / (peak * jax.device_count())
        print(
            f"[{r['mode']}] step {r['step_s']:.3f}s (cpu {r['cpu_s']:.2f}s)  {r['tokens_per_s']:.0f} tok/s  "
            f"{r['achieved_tflops']:.3f} TFLOP/s  MFU {100 * r['mfu']:.1f}%  "
            f"HLO {r['hlo_mflops_per_token']:.0f} MFLOP/token",
            flush=True,
        )
        results.append(r)
    by_mode = {r["mode"]: r for r in results}
    speedup = {}
    if "lora" in by_mode and "full" in by_mode:
        lo, fu = by_mode["lora"], by_mode["full"]
        speedup = {
            "lora_speedup_per_token": lo["tokens_per_s"] / fu["tokens_per_s"],
            "lora_speedup_cpu_s": fu["cpu_s"] / lo["cpu_s"],
            "lora_hlo_flops_ratio": fu["hlo_mflops_per_token"] / lo["hlo_mflops_per_token"],
        }
        print(
            f"[lora vs full] {lo['tokens_per_s']:.0f} vs {fu['tokens_per_s']:.0f} tok/s: "
            f"{speedup['lora_speedup_per_token']:.2f}x per token (CPU seconds {speedup['lora_speedup_cpu_s']:.2f}x, "
            f"HLO FLOPs {speedup['lora_hlo_flops_ratio']:.2f}x)  on {cpu}",
            flush=True,
        )
    out = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "cpu_model": cpu,
        "steps_interleaved": True,
        **speedup,
        "model": args.model,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "lora_rank": args.lora_rank,
        "mesh": dict(mesh.shape),
        "n_matmul_params": n,
        "n_lora_params": n_lora,
        "matmul_peak_tflops": peak / 1e12,
        "matmul_peak_n": peak_n,
        "update": results,
    }
    if args.decode:
        bw = copy_bandwidth(1 << (30 if accel else 28))
        out["copy_bandwidth_gbs"] = bw / 1e9
        d = bench_decode(cfg, args, plan, bw)
        print(
            f"[decode] {d['decode_tokens_per_s']:.0f} tok/s vs roofline {d['decode_roofline_tokens_per_s']:.0f} "
            f"({100 * d['decode_fraction_of_roofline']:.1f}%)",
            flush=True,
        )
        out.update(d)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
