"""Multi-turn ReMA rollout: how much of its wall time is spent inside the compiled sampler.

The default: 8 built-in questions × 4 samples = 32 trajectories, multi-turn MAMRP with the
official code's prompts, up to 3 rounds (MTA then RA) of up to 96 new tokens each, temperature
1.0, SmolLM2-135M-Instruct fp32, both agents on the shared base weights. One warm-up rollout
compiles every bucket it meets; the measured rollout repeats it with the same seed (same shapes,
so no compilation) and splits its wall time into:

* kernel: inside the compiled prefill / decode executables (dispatch to results on the host) and
  the per-agent weight fusion (`Sampler.stats`);
* python: everything else (chat templating, splicing sampled ids, the turn state machine, stop
  handling). Building the per-role training sequences comes after the rollout and is not counted.

It also measures whether reusing the KV cache of the unchanged conversation prefix between turns
would pay: the share of prompt tokens that are the same agent's previous prompt + its own sampled
ids (`rollout.prefix_reuse_stats`), and the prefill seconds that share stands for.

    python benchmarks/rollout.py            # 8 × 4, 3 rounds, 96 tokens per turn
    python benchmarks/rollout.py --quick    # 2 × 2, 2 rounds, 32 tokens per turn

The last line printed is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 questions × 2 samples, 2 rounds of 32 tokens")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max_turns", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--max_prompt_len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no_share_prefix",
        action="store_true",
        help="prefill every row's whole prompt (off: the agents' shared system prompt once per call)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.samples, args.max_turns, args.max_new_tokens = 2, 2, 2, 32

    import jax

    from rema_jax import rollout as R
    from rema_jax.models.hub import load
    from rema_jax.sampling import Sampler
    from rema_jax.sampling.bucketing import next_pow2
    from rema_jax.tasks.builtin import builtin_split

    model = load("smollm2-135m")
    tasks = builtin_split(args.questions, 0, seed=0)[0]
    tasks = [tasks[i * len(tasks) // args.questions] for i in range(args.questions)]  # spread over families
    cfg = R.RolloutConfig(
        mode="multi_turn",
        num_samples=args.samples,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=args.max_prompt_len,
        stop_when_truncated=False,
        temperature=1.0,
    )
    sampler = Sampler(
        model.config,
        model.tokenizer,
        max_cache_len=next_pow2(args.max_prompt_len) + next_pow2(args.max_new_tokens),
        share_prefix=not args.no_share_prefix,
    )
    adapters = {role: None for role in cfg.agent_roles}
    encoder = R.ChatEncoder(model.tokenizer)
    questions = [t.question for t in tasks]

    def rollout():
        policy = R.make_sampler_policy(sampler, model.params, adapters, seed=args.seed)
        t0 = time.perf_counter()
        trajs = R.run_rollout(policy, encoder, questions, cfg)
        return trajs, time.perf_counter() - t0

    _, warm_s = rollout()
    warm = sampler.reset_stats()
    trajs, wall_s = rollout()
    st = sampler.stats
    python_s = wall_s - st.kernel_s - st.compile_s
    reuse = R.prefix_reuse_stats(trajs)
    # Prefill cost scales with the padded slots it computes; the reusable share of real prompt
    # tokens is what a per-(trajectory, agent) prefix cache would skip.
    reuse_saving_s = st.prefill_s * reuse["reusable_fraction"]
    finish = {}
    for tr in trajs:
        finish[tr.finish_reason] = finish.get(tr.finish_reason, 0) + 1
    out = {
        "device": str(jax.devices()[0]),
        "share_prefix": not args.no_share_prefix,
        "questions": args.questions,
        "samples": args.samples,
        "trajectories": len(trajs),
        "max_turns": args.max_turns,
        "max_new_tokens": args.max_new_tokens,
        "rounds_mean": sum(tr.num_turns for tr in trajs) / len(trajs),
        "finish_reasons": finish,
        "warmup_s": round(warm_s, 2),
        "warmup_compile_s": round(warm.compile_s, 2),
        "compile_count": sampler.compile_count,
        "wall_s": round(wall_s, 3),
        "kernel_s": round(st.kernel_s, 3),
        "prefill_s": round(st.prefill_s, 3),
        "decode_s": round(st.decode_s, 3),
        "fuse_s": round(st.fuse_s, 3),
        "compile_s": round(st.compile_s, 3),
        "python_s": round(python_s, 3),
        "kernel_share": round(st.kernel_s / wall_s, 4),
        "sampler_calls": st.calls,
        "new_tokens": st.new_tokens,
        "prompt_tokens": st.prompt_tokens,
        "prefill_slots": st.prefill_slots,
        "new_tokens_per_s": round(st.new_tokens / wall_s, 1),
        "reusable_prefix_fraction": round(reuse["reusable_fraction"], 4),
        "prefix_reuse_saving_s_upper_bound": round(reuse_saving_s, 3),
        "prefix_reuse_saving_share_upper_bound": round(reuse_saving_s / wall_s, 4),
    }
    print(
        f"rollout of {len(trajs)} trajectories ({out['rounds_mean']:.1f} rounds mean, {st.calls} sampler calls, "
        f"{st.new_tokens} new tokens): {wall_s:.2f} s; in the kernel {st.kernel_s:.2f} s "
        f"({100 * out['kernel_share']:.1f}%: prefill {st.prefill_s:.2f}, decode {st.decode_s:.2f}, "
        f"fuse {st.fuse_s:.2f}), compiling {st.compile_s:.2f} s, Python {python_s:.2f} s"
    )
    print(
        f"prefix reuse: {100 * reuse['reusable_fraction']:.0f}% of prompt tokens are the same agent's previous "
        f"prompt + output; skipping their prefill would save at most {reuse_saving_s:.2f} s "
        f"({100 * out['prefix_reuse_saving_share_upper_bound']:.1f}% of the rollout)"
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
