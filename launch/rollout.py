"""Command-line demo: roll out a ReMA protocol on one question and print both agents' messages.

  python launch/rollout.py                                  # multi-turn MAMRP, SmolLM2-135M
  python launch/rollout.py --mode=single_turn --num_samples=2
  python launch/rollout.py --mode=vrp --greedy

Loads the model with `rema_jax.models.hub.load`, binds a `rema_jax.sampling.Sampler` to the rollout
policy (shared parameters: both agents use the base weights), prints every message, the finish
reason, the training-sequence shapes, where the time went and how much prompt prefix a KV cache
could reuse between turns.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.panel import Panel  # noqa: E402
from rich.table import Table  # noqa: E402

from rema_jax.cli import COMPILATION_CACHE_HELP, run_main  # noqa: E402

SEED_QUESTION = "Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b"
SEED_ANSWER = "-1"

_STYLE = {"meta_thinking": "cyan", "reasoning": "green", "single": "magenta"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="multi_turn", choices=["vrp", "mrp", "single_turn", "multi_turn"])
    p.add_argument(
        "--prompt_variant",
        default=None,
        choices=["paper", "code"],
        help="default: paper for single-turn modes, code for multi-turn",
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or an HF dir")
    p.add_argument("--question", default=SEED_QUESTION)
    p.add_argument("--answer", default=SEED_ANSWER, help="gold answer, printed for reference")
    p.add_argument("--num_samples", type=int, default=1, help="trajectories per question (n)")
    p.add_argument("--max_turns", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=256, help="per turn")
    p.add_argument("--max_prompt_len", type=int, default=1024, help="conversation limit per agent")
    p.add_argument("--no_stop_when_truncated", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compilation_cache", default=None, help=COMPILATION_CACHE_HELP)
    return p.parse_args(argv)


class _TimedPolicy:
    """Wraps a policy to time the sampler calls (the rest of the rollout is Python)."""

    def __init__(self, policy):
        self.policy, self.seconds, self.calls, self.tokens = policy, 0.0, 0, 0

    def __call__(self, role, prompts, sampling):
        t0 = time.perf_counter()
        gens = self.policy(role, prompts, sampling)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.tokens += sum(len(g.token_ids) for g in gens)
        return gens


def main(argv=None) -> int:
    args = parse_args(argv)
    from rema_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache)  # before any device use
    console = Console()
    from rema_jax import rollout as R
    from rema_jax.models.hub import load
    from rema_jax.sampling import Sampler
    from rema_jax.sampling.bucketing import next_pow2

    cfg = R.RolloutConfig(
        mode=args.mode,
        prompt_variant=args.prompt_variant,
        num_samples=args.num_samples,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=args.max_prompt_len,
        stop_when_truncated=not args.no_stop_when_truncated,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
    )

    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype)
    console.print(
        f"[bold]model[/] {args.model}: {model.config.num_layers} layers, hidden "
        f"{model.config.hidden_size}, loaded in {time.perf_counter() - t0:.1f}s"
    )
    # The sampler buckets prompt lengths to powers of two: leave room for the largest bucket.
    sampler = Sampler(model.config, model.tokenizer, max_cache_len=next_pow2(args.max_prompt_len) + args.max_new_tokens)
    adapters = {role: None for role in cfg.agent_roles}  # shared parameters
    policy = _TimedPolicy(R.make_sampler_policy(sampler, model.params, adapters, seed=args.seed))
    encoder = R.ChatEncoder(model.tokenizer)

    t0 = time.perf_counter()
    trajs = R.run_rollout(policy, encoder, [args.question], cfg)
    rollout_s = time.perf_counter() - t0

    console.print(Panel(escape(args.question), title=f"question (gold answer {args.answer})", style="bold"))
    for tr in trajs:
        console.rule(f"sample {tr.sample_index}: {tr.finish_reason}, {tr.num_turns} turn(s)")
        for t in tr.turns:
            body = t.text if not t.is_dummy else "(dummy: trajectory ended before the RA answered)"
            title = f"{t.role} turn {t.turn}  [{t.stop_reason}, {len(t.token_ids)} tok, prompt {t.prompt_len}]"
            console.print(
                Panel(
                    escape(body or "(empty)"),
                    title=escape(title),
                    style=_STYLE.get(t.role, "white"),
                    title_align="left",
                )
            )
        console.print(f"[bold]final answer:[/] {escape(repr(tr.final_answer[-300:]))}")

    table = Table(title="training sequences (Contract 4)")
    for col in ("role", "tokens [N, L]", "loss tokens", "eos labels", "turns"):
        table.add_column(col)
    for role in cfg.agent_roles:
        seqs = R.build_role_sequences(trajs, encoder, cfg, role)
        table.add_row(
            role,
            str(seqs.shape),
            str(int(seqs.loss_mask.sum())),
            str(int(seqs.eos_label_mask.sum())),
            str(seqs.num_turns.tolist()),
        )
    console.print(table)
    reuse = R.prefix_reuse_stats(trajs)
    console.print(
        f"rollout {rollout_s:.1f}s; sampler calls {policy.calls}, {policy.seconds:.1f}s "
        f"({100 * policy.seconds / max(rollout_s, 1e-9):.1f}% of the rollout, incl. "
        f"{sampler.compile_seconds:.1f}s compiling {sampler.compile_count} programs); "
        f"{policy.tokens} tokens sampled; reusable prompt prefix "
        f"{reuse['reusable_prefix_tokens']:.0f}/{reuse['prompt_tokens']:.0f} tokens "
        f"({100 * reuse['reusable_fraction']:.0f}%)"
    )
    return 0


if __name__ == "__main__":
    run_main(main, use_absl=False)
