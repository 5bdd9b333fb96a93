"""Sampler throughput: rema_jax's jitted sampler vs `transformers` PyTorch `generate`, same weights.

SmolLM2-135M-Instruct (the embedded GGUF, dequantised to fp32 on both sides), a 64-token prompt,
128 new tokens (EOS ignored so both sides generate the same count), temperature 1.0, no top-k/top-p.
Each side runs in its own subprocess, one after the other (clean peak-RSS figures, no competition
for the cores); timings are the median of `--repeats` runs after a warm-up call, and our compile
time is reported separately. Every row gets the same prompt, so the sampler's shared-prefix prefill
is off unless `--share-prefix` (it would compute the identical rows' prompt once: not what this
kernel comparison measures). Process CPU seconds are reported too (`ratio_cpu_time`): on a machine
shared with other jobs they measure work done better than wall time.

A third child (skipped with `--skip-hf`) times the weight matmuls of one of our decode steps alone
(the sampler's fused kernels, column blocks and products, one independent input per product) at each
batch: `ceiling` = transformers' decode step / those matmuls, the ratio this sampler would reach if
everything but its weight matmuls (attention, norms, sampling, the loop) cost nothing. A ceiling under the goal says the goal needs faster matmuls than XLA:CPU's
on this CPU, not a better sampler. The last line printed is one JSON object with everything.

    python benchmarks/sampler.py            # batch 1, 8, 32
    python benchmarks/sampler.py --quick    # batch 1 and 8, 32 new tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SYSTEM = "You are a helpful assistant."
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.update_memory import _cpu_model as cpu_model  # noqa: E402

USER = (
    "Solve the following problem step by step and put the final answer in a box. "
    "Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b. "
    "Explain each step of the expansion, compare the coefficients and check the result carefully."
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompt_ids(tokenizer, length: int) -> list[int]:
    """A chat-templated prompt of exactly `length` tokens (the user turn is repeated/truncated)."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER * 4}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids[-length:] if len(ids) >= length else (ids * (length // len(ids) + 1))[-length:]


def run_ours(args) -> dict:
    import jax

    from rema_jax.models.hub import load
    from rema_jax.sampling import Sampler, SamplingParams

    t0 = time.perf_counter()
    model = load("smollm2-135m")
    load_s = time.perf_counter() - t0
    prompt = _prompt_ids(model.tokenizer, args.prompt_len)
    sampler = Sampler(
        model.config,
        model.tokenizer,
        max_cache_len=args.prompt_len + args.new_tokens + 64,
        share_prefix=args.share_prefix,
    )
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
    out = {"load_s": round(load_s, 2), "device": str(jax.devices()[0]), "batches": {}}
    for b in args.batches:
        prompts = [prompt] * b
        c0, n0 = sampler.compile_seconds, sampler.compile_count
        t0 = time.perf_counter()
        gens = sampler.generate(model.params, None, prompts, sp, seed=0)
        first_s = time.perf_counter() - t0
        assert all(len(g.token_ids) == args.new_tokens for g in gens), "EOS must be ignored"
        times, cpus = [], []
        for r in range(args.repeats):
            t0, cpu0 = time.perf_counter(), time.process_time()
            sampler.generate(model.params, None, prompts, sp, seed=r + 1)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - cpu0)
        med = statistics.median(times)
        out["batches"][str(b)] = {
            "tokens_per_s": round(b * args.new_tokens / med, 2),
            "median_s": round(med, 4),
            "median_cpu_s": round(statistics.median(cpus), 4),
            "times_s": [round(t, 4) for t in times],
            "first_call_s": round(first_s, 2),
            "compile_s": round(sampler.compile_seconds - c0, 2),
            "compiles": sampler.compile_count - n0,
        }
        print(f"[ours] batch {b}: {out['batches'][str(b)]}", file=sys.stderr, flush=True)
    out["compile_count"] = sampler.compile_count
    out["compile_s"] = round(sampler.compile_seconds, 2)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rema_jax.models.hub import smollm2_gguf_path

    torch.set_num_threads(args.torch_threads)
    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = _prompt_ids(tok, args.prompt_len)
    out = {"load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(), "batches": {}}
    kw = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=tok.eos_token_id,
    )
    for b in args.batches:
        ids = torch.tensor([prompt] * b, dtype=torch.long)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            times, cpus = [], []
            for r in range(args.repeats):
                torch.manual_seed(r)
                t0, c0 = time.perf_counter(), time.process_time()
                res = model.generate(ids, attention_mask=mask, **kw)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        assert res.shape[1] == args.prompt_len + args.new_tokens
        med = statistics.median(times)
        out["batches"][str(b)] = {
            "tokens_per_s": round(b * args.new_tokens / med, 2),
            "median_s": round(med, 4),
            "median_cpu_s": round(statistics.median(cpus), 4),
            "times_s": [round(t, 4) for t in times],
        }
        print(f"[hf] batch {b}: {out['batches'][str(b)]}", file=sys.stderr, flush=True)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def run_matmul(args) -> dict:
    """Median seconds of the weight matmuls of one of our decode steps per batch: the sampler's own
    fused kernels (`kernel.fuse_params`, the column blocks it uses at that batch) and its `_matmul`,
    one independent `[B, in]` input per product (nothing chained or skipped), fp32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rema_jax.models.hub import load
    from rema_jax.sampling import Sampler, kernel

    model = load("smollm2-135m")
    sampler = Sampler(model.config, model.tokenizer, max_cache_len=args.prompt_len + args.new_tokens + 64)

    kernels = lambda layer: (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down)  # noqa: E731

    @jax.jit
    def step(fp, xs):
        total = jnp.sum(kernel._matmul(xs[-1], fp.lm_head_hv))
        for layer in fp.layers:
            for x, w in zip(xs, kernels(layer)):
                total += jnp.sum(kernel._matmul(x, w))  # reduce: outputs stay live, tiny to return
        return total

    rng, out = np.random.default_rng(0), {}
    for b in args.batches:
        fp = kernel.fuse_params(model.config, model.params, None, sampler.column_blocks(b)[0])
        ins = (*kernels(fp.layers[0]), fp.lm_head_hv)  # one [B, in] input per product (in: a block's rows)
        xs = [jnp.asarray(rng.standard_normal((b, w[0].shape[0]), dtype=np.float32)) for w in ins]
        step(fp, xs).block_until_ready()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            step(fp, xs).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[str(b)] = round(statistics.median(times), 5)
        del fp
    return {"batches": out}


def _child(side: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, 32 new tokens, 1 repeat")
    ap.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="only measure our sampler")
    ap.add_argument(
        "--share-prefix",
        action="store_true",
        help="let our sampler prefill the (identical) prompts once (off: a per-row kernel comparison)",
    )
    ap.add_argument("--side", choices=("ours", "hf", "matmul"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.side == "ours":
        print(json.dumps(run_ours(args)))
        return
    if args.side == "hf":
        print(json.dumps(run_hf(args)))
        return
    if args.side == "matmul":
        print(json.dumps(run_matmul(args)))
        return
    argv = [
        "--batches",
        ",".join(map(str, args.batches)),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--torch-threads",
        str(args.torch_threads),
    ] + (["--share-prefix"] if args.share_prefix else [])
    ours = _child("ours", argv)
    hf = None if args.skip_hf else _child("hf", argv)
    matmul = None if args.skip_hf else _child("matmul", argv)  # the ceiling needs transformers' step
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32)",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": 1.0,
        "repeats": args.repeats,
        "share_prefix": args.share_prefix,
        "ours": ours,
        "transformers": hf,
        "matmul_step_s": matmul["batches"] if matmul else None,
        "ratio": {},
        "ratio_cpu_time": {},
        "ceiling": {},
    }
    for b in map(str, args.batches):
        ours_tps = ours["batches"][b]["tokens_per_s"]
        hf_tps = hf["batches"][b]["tokens_per_s"] if hf else None
        result["ratio"][b] = round(ours_tps / hf_tps, 2) if hf_tps else None
        # CPU seconds per run: less sensitive to other processes sharing the cores than wall time.
        result["ratio_cpu_time"][b] = (
            round(hf["batches"][b]["median_cpu_s"] / ours["batches"][b]["median_cpu_s"], 2) if hf else None
        )
        step_ms = 1e3 * ours["batches"][b]["median_s"] / args.new_tokens
        line = (
            f"batch {b:>3}: ours {ours_tps:8.1f} tok/s   transformers {hf_tps if hf_tps else float('nan'):8.1f} tok/s"
            f"   ratio {result['ratio'][b]} (CPU-time ratio {result['ratio_cpu_time'][b]}); step ms ours {step_ms:.1f}"
        )
        if hf:
            matmul_ms = 1e3 * matmul["batches"][b]
            hf_step_ms = 1e3 * hf["batches"][b]["median_s"] / args.new_tokens
            result["ceiling"][b] = round(hf_step_ms / matmul_ms, 2)
            line += f" (weight matmuls alone {matmul_ms:.1f}), transformers {hf_step_ms:.1f}: ceiling {result['ceiling'][b]}"
        print(line)
    print(
        f"compile: {ours['compile_count']} executables, {ours['compile_s']} s; peak RSS ours "
        f"{ours['peak_rss_mb']} MB, transformers {hf['peak_rss_mb'] if hf else 'n/a'} MB"
    )
    print(f"CPU: {cpu_model()}")
    result["cpu"] = cpu_model()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
