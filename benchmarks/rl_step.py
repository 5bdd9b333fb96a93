"""Whole RL step of the default config, with the plain training passes and with the default ones, in the same run.

Variants (``VARIANTS``): ``off`` = the plain training passes, as the official code runs them: every row's
every token (``update.share_prefix=False``) and a log-prob pass for π_old before the update
(``update.old_logprobs='recompute'``); ``on`` = the default config as shipped (shared prefixes, and π_old
from the update's own forward, since it takes one optimizer step per batch); ``prefix`` = shared
prefixes with the π_old pass, to split the gain between the two (``--variants off prefix on``);
``plain`` = ``off`` with the rollout's prefill plain too (``model.sampler_share_prompts=False``: every
row's whole prompt, where ``off`` and ``on`` prefill each distinct prompt once and group prefixes once
per group), so ``plain`` vs ``off`` is the rollout's prompt sharing and ``plain`` vs ``on`` everything
(``--variants plain off on``); ``bf16`` = ``on`` with the sampler's weights in bf16
(``model.sampler_weight_dtype``, an opt-in: it samples from the bf16-rounded policy); ``nocompact`` =
``on`` with every decode row stepping until the batch's last one finishes
(``model.sampler_compact_min_batch=0``), so ``nocompact`` vs ``on`` is the rollout's decode compaction;
``save_mlp`` = ``on`` with the remat policy that keeps the MLP's gate/up products
(``model.remat_policy``, an opt-in: more memory in the update); ``noreuse`` = ``on`` with every sampler
call compiling its own prefill layout (``model.sampler_layout_reuse=0``), so ``noreuse`` vs ``on`` is
the rollout's layout reuse.
``speedup`` is ``off`` / ``on``, the training passes' gain.

Each variant runs ``--steps`` real steps of ``configs/default.py``'s ``rl`` section (single-turn ReMA,
2 questions x 4 plans x 2 solutions, alternating RA / MTA phases of 2 steps, GRPO, LoRA) through the
real ``Trainer`` in its own child process: a fresh heap for its peak RSS and a cold start (the
persistent compilation cache is off), so each variant pays its own compiles. All variants use the
same seed, so step 1 rolls out the same tokens; later steps may sample differently, because the
paths' updates agree only to fp32 rounding. The model is the embedded SmolLM2-135M-Instruct (GGUF), or
random weights of its shape with ``--random_weights``; the LoRA adapters start at zero unless
``--adapters`` names an SFT's adapters (e.g. ``runs/default/sft/adapters`` of the main command).

Per variant and step it reports the trainer's phase times: rollout (sampling + grading), prepare (the
batches and the old / reference log-prob passes), update (the jitted optimizer step), the whole step,
and the XLA backend compiles during each phase (count and seconds, from jax.monitoring, attributed to
the phase that was running). A phase that compiled is not a steady-state figure (its time includes
tracing and compiling), and the variants compile in different steps (the shared-prefix buckets
grow), so the comparison uses the (step, phase) cells that compiled in *no* variant (a cell
whose compiles took under ``QUIET_COMPILE_FRACTION`` = 1% of its time counts as not compiling: after
``memory.release_programs='phase'`` clears JAX's caches, small jitted helpers recompile in
milliseconds in every later rollout):

    steady_p(v) = mean over those steps i of t_v[i][p],    steady step(v) = sum_p steady_p(v),
    speedup = steady step(off) / steady step(on),          speedup_p = steady_p(off) / steady_p(on).

A phase with no such cell has no steady figure (say so rather than guess; add steps). The default 4
steps cover one RA and one MTA phase; ``--quick`` (3 steps) gives steady RA figures only.
``first_steps_s`` = all steps' sum, compiles included (what a short run like the README's main command
pays). ``peak_rss_mb`` = the largest child's peak RSS (a ``host_memory.PeakRss`` span over its run).

    python benchmarks/rl_step.py --quick              # 3 steps per variant, about 8 min on 2 cores
    python benchmarks/rl_step.py --steps 6            # both phases twice
    python benchmarks/rl_step.py --variants on        # one variant
    python benchmarks/rl_step.py --variants off prefix on   # what each default pass contributes

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

from benchmarks.update_memory import SMOLLM2 as SMOLLM2_SHAPE  # noqa: E402
from benchmarks.update_memory import _cpu_model as cpu_model  # noqa: E402
from benchmarks.update_memory import _hwm_mib  # noqa: E402

PHASES = ("rollout", "prepare", "update", "step")
PLAIN_UPDATE = {"share_prefix": False, "old_logprobs": "recompute"}
VARIANTS = {  # section overrides of configs/default.py's rl section
    "off": {"update": PLAIN_UPDATE},
    "prefix": {"update": {"share_prefix": True, "old_logprobs": "recompute"}},
    "on": {},
    "plain": {"update": PLAIN_UPDATE, "model": {"sampler_share_prompts": False}},
    "bf16": {"model": {"sampler_weight_dtype": "bfloat16"}},
    "nocompact": {"model": {"sampler_compact_min_batch": 0}},
    "save_mlp": {"model": {"remat_policy": "save_mlp"}},
    "noreuse": {"model": {"sampler_layout_reuse": 0}},
}
TINY = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8)


def _child(args: argparse.Namespace) -> dict:
    """One variant: ``args.steps`` trainer steps; returns its per-step figures."""
    from rema_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache("off")  # a cold start for each variant: compiles are part of the figure
    import jax
    from jax import monitoring

    current = {"phase": "other"}
    compiles = {p: {"n": 0, "s": 0.0} for p in (*PHASES[:-1], "other")}

    def on_event(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[current["phase"]]["n"] += 1
            compiles[current["phase"]]["s"] += duration

    monitoring.register_event_duration_secs_listener(on_event)

    from configs import default
    from rema_jax.training.config import load_train_config
    from rema_jax.training.trainer import Trainer

    raw = default.get_config().rl.to_dict()
    for section, overrides in VARIANTS[args.variant].items():
        raw[section].update(overrides)
    raw["loop"]["steps"] = args.steps
    raw["loop"]["eval_before"] = False
    raw["loop"]["eval_questions"] = 0
    raw["memory"]["check"] = False
    if args.random_weights:
        raw["model"]["random_init"] = dict(SMOLLM2_SHAPE)
    if args.tiny:  # the smoke test's: a 2-layer random model, short answers
        raw["model"]["random_init"] = TINY
        raw["rollout"]["max_new_tokens"] = 8
    if args.adapters:
        raw["model"]["init_adapters_from"] = args.adapters
    config = load_train_config(raw)

    from rema_jax.host_memory import PeakRss

    steps = []
    # A span, not the kernel's VmHWM at the end: the trainer's phase spans reset that mark, so it
    # would hold only the peak since the last phase started.
    with tempfile.TemporaryDirectory() as workdir, PeakRss() as whole:
        t0 = time.perf_counter()
        trainer = Trainer(config, workdir)
        setup_s = time.perf_counter() - t0
        _attribute_compiles(trainer, current)
        for _ in range(args.steps):
            for c in compiles.values():
                c.update(n=0, s=0.0)
            m = trainer.step()
            steps.append(
                {
                    "trained": m["phase/trained"],
                    **{p: m[f"time/{p}_s"] for p in PHASES},
                    "compiles": {p: c["n"] for p, c in compiles.items()},
                    "compile_s": {p: c["s"] for p, c in compiles.items()},
                    "rows": {r: m.get(f"{r}/loss_tokens") for r in trainer.roles},
                    "behaviour_gap": {r: m.get(f"{r}/behaviour_logprob_gap") for r in trainer.roles},
                    "peak_rss_mib": {p: m.get(f"memory/{p}_peak_rss_mib") for p in PHASES[:-1]},
                }
            )
            print(
                f"  [{args.variant}] step {len(steps)} ({m['phase/trained']}): "
                + ", ".join(
                    f"{p} {steps[-1][p]:.1f} s ({compiles.get(p, {}).get('n', 0)} compiles)" for p in PHASES[:-1]
                )
                + f", step {steps[-1]['step']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        trainer.checkpoints.close()
    return {
        "variant": args.variant,
        "setup_s": setup_s,
        "steps": steps,
        "peak_rss_mb": whole.mib if whole.mib is not None else _hwm_mib(),
        "backend": jax.default_backend(),
    }


def _attribute_compiles(trainer, current: dict) -> None:
    """Set ``current["phase"]`` while the trainer's rollout, prepare and update phases run (wrapping the
    three calls ``Trainer.step`` times), so the compile listener can tell which phase compiled."""

    def during(phase, fn):
        def wrapped(*a, **kw):
            current["phase"] = phase
            try:
                return fn(*a, **kw)
            finally:
                current["phase"] = "other"

        return wrapped

    trainer.worker.collect = during("rollout", trainer.worker.collect)
    trainer._role_batches = during("prepare", trainer._role_batches)
    trainer.learner.update = during("update", trainer.learner.update)


QUIET_COMPILE_FRACTION = 0.01


def _compiled(step: dict, phase: str) -> bool:
    """Whether ``phase`` of ``step`` compiled for more than ``QUIET_COMPILE_FRACTION`` of its time (any
    compile when the step has no compile seconds)."""
    if step["compiles"].get(phase, 0) == 0:
        return False
    seconds = step.get("compile_s", {}).get(phase)
    return seconds is None or seconds > QUIET_COMPILE_FRACTION * step[phase]


def steady_state(variants: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant, the mean time of each phase over the steps in which that phase compiled (see
    ``_compiled``) in no variant, and their sum ("step"); ``cells[p]`` = those steps (1-based). A phase
    without such a step is None (and so is "step")."""
    names = list(variants)
    n = min(len(v) for v in variants.values())
    out = {v: {} for v in names}
    cells = {}
    for p in PHASES[:-1]:
        quiet = [i for i in range(n) if not any(_compiled(variants[v][i], p) for v in names)]
        cells[p] = [i + 1 for i in quiet]
        for v in names:
            out[v][p] = statistics.fmean(variants[v][i][p] for i in quiet) if quiet else None
    for v in names:
        parts = [out[v][p] for p in PHASES[:-1]]
        out[v]["step"] = None if None in parts else sum(parts)
        out[v]["cells"] = cells
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="RL steps per variant (default 4: one RA + one MTA phase)")
    ap.add_argument("--quick", action="store_true", help="3 steps per variant (fits 10 min on 2 cores)")
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["off", "on"])
    ap.add_argument("--random_weights", action="store_true", help="random weights of SmolLM2-135M's shape")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model, 8 new tokens (smoke test)")
    ap.add_argument("--adapters", default=None, help="start both agents from these SFT adapters")
    ap.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.quick:
        args.steps = 3
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 compiles)")
    if args.variant:  # child
        print(json.dumps(_child(args)), flush=True)
        return

    machine = cpu_model()
    print(f"RL step, configs/default.py rl section, passes {' vs '.join(args.variants)}; CPU: {machine}")
    results = {}
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--steps", str(args.steps)]
        cmd += ["--random_weights"] if args.random_weights else []
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--adapters", args.adapters] if args.adapters else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"rl_step: variant {v} failed (exit {proc.returncode}); its stderr is above")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["wall_s"] = time.perf_counter() - t0
        out["first_steps_s"] = sum(s["step"] for s in out["steps"])
        out["compiles_after_step1"] = sum(sum(s["compiles"].values()) for s in out["steps"][1:])
        results[v] = out
    for v, st in steady_state({v: r["steps"] for v, r in results.items()}).items():
        results[v]["steady"] = st

    print(
        f"\n{'variant':<8}"
        + "".join(f"{p + ' s':>11}" for p in PHASES)
        + f"{'all steps s':>13}{'compiles':>10}{'peak RSS MiB':>14}"
    )
    for v, r in results.items():
        s = r["steady"]
        n = sum(sum(x["compiles"].values()) for x in r["steps"])
        print(
            f"{v:<8}"
            + "".join("{:>11}".format("-" if s[p] is None else f"{s[p]:.1f}") for p in PHASES)
            + f"{r['first_steps_s']:>13.1f}{n:>10}{r['peak_rss_mb']:>14.0f}"
        )
    for v, r in results.items():
        peaks = {
            p: [x["peak_rss_mib"][p] for x in r["steps"] if x["peak_rss_mib"].get(p) is not None] for p in PHASES[:-1]
        }
        r["phase_peak_rss_mib"] = {p: max(x) if x else None for p, x in peaks.items()}
        print(
            f"  {v}: peak RSS by phase (MiB) "
            + ", ".join(f"{p} {x:.0f}" for p, x in r["phase_peak_rss_mib"].items() if x)
        )
    for v, r in results.items():
        gaps = [g for x in r["steps"] for g in x.get("behaviour_gap", {}).values() if g is not None]
        r["behaviour_gap_mean"] = sum(gaps) / len(gaps) if gaps else None
        if gaps:
            print(f"  {v}: mean |sampler - training| log-prob of the drawn tokens {r['behaviour_gap_mean']:.2e}")
    cells = next(iter(results.values()))["steady"]["cells"]
    print(
        "(phase columns: mean over the steps in which the phase compiled in no variant: "
        + ", ".join(f"{p} {cells[p] or 'none'}" for p in PHASES[:-1])
        + "; 'step' = their sum; 'all steps': every step's time, compiles included)"
    )
    summary = {
        "benchmark": "rl_step",
        "cpu": machine,
        "steps": args.steps,
        "model": "tiny random"
        if args.tiny
        else "random SmolLM2-135M shape"
        if args.random_weights
        else "SmolLM2-135M-Instruct (GGUF)",
        "adapters": args.adapters,
        "variants": results,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
    }
    if {"off", "on"} <= set(results):
        off, on = results["off"], results["on"]
        ratio = {p: None if off["steady"][p] is None else off["steady"][p] / on["steady"][p] for p in PHASES}
        summary["speedup"] = ratio["step"]
        summary["speedup_by_phase"] = ratio
        summary["speedup_all_steps"] = off["first_steps_s"] / on["first_steps_s"]
        print(
            "speedup (steady whole step, off / on): "
            + (
                "- (a phase never ran without compiling: add steps)"
                if ratio["step"] is None
                else f"{ratio['step']:.2f}x"
            )
            + "; by phase "
            + ", ".join(f"{p} " + ("-" if x is None else f"{x:.2f}x") for p, x in ratio.items())
            + f"; all {args.steps} steps with compiles: {summary['speedup_all_steps']:.2f}x"
        )
    if {"plain", "on"} <= set(results) and results["plain"]["steady"]["step"] is not None:
        plain, on = results["plain"], results["on"]
        summary["speedup_nothing_shared"] = plain["steady"]["step"] / on["steady"]["step"]
        print(
            f"nothing shared (plain) / on: steady step {summary['speedup_nothing_shared']:.2f}x, rollout "
            + (
                "-"
                if plain["steady"]["rollout"] is None
                else f"{plain['steady']['rollout'] / on['steady']['rollout']:.2f}x"
            )
            + f", all {args.steps} steps {plain['first_steps_s'] / on['first_steps_s']:.2f}x"
        )
    print(f"peak_rss_mb {summary['peak_rss_mb']:.0f}; CPU: {machine}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
