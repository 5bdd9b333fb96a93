"""The CPU learning experiment: ReMA vs a single-agent RL baseline, in the paper's Table 1 layout.

    python launch/experiment.py --workdir=runs/experiment

Runs, with the same seeds, data split and held-out questions:
  1. VRP_RL: one agent (chain of thought), RL with the paper's shaped reward (configs/vrp_rl_default.py);
  2. ReMA: single-turn meta-thinking + reasoning agents, alternating updates (configs/default.py);
  3. (``--ablation``) ReMA with the consistency reward for the meta-thinking agent.
Each run evaluates greedily on the held-out split before training (VRP = the untrained model) and
after. Writes ``results.md`` (Table 1 layout: rows = task families + average, columns = VRP,
VRP_RL, ReMA, deltas against VRP), ``results.json``, ``reward.png`` and ``heldout_accuracy.png``.
Step counts and sizes come from the two configs; override them with the flags below.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_integer("steps", None, "RL steps per run (default: the configs').")
flags.DEFINE_integer("eval_questions", 32, "Held-out questions (stratified over family × level).")
flags.DEFINE_integer("eval_every", 4, "Held-out evaluation every k steps.")
flags.DEFINE_bool("ablation", False, "Also run the consistency-reward ablation (one more run).")
flags.DEFINE_multi_string("override", [], "Extra config overrides for every run, e.g. loop.seed=1.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

VERIFY_PHRASES = re.compile(
    r"(let'?s (verify|check|double[- ]check)|to (verify|check)|verif(y|ication)|double[- ]check|"
    r"check (the|our|this) (answer|solution|result)|go through the solution)", re.IGNORECASE)


def _apply_overrides(config, overrides):
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = json.loads(value) if value[:1] in "[{0123456789-tfn\"" else value
    return config


def _run_configs():
    from configs import default, vrp_rl_default
    runs = {"VRP_RL": vrp_rl_default.get_config(), "ReMA": default.get_config()}
    if FLAGS.ablation:
        c = default.get_config()
        c.reward = dict(kind="consistency")
        runs["ReMA_consistency"] = c
    for c in runs.values():
        c.loop.eval_questions = FLAGS.eval_questions
        c.loop.eval_every = FLAGS.eval_every
        c.loop.eval_before = True
        if FLAGS.steps:
            c.loop.steps = FLAGS.steps
        _apply_overrides(c, FLAGS.override)
    return runs


def _per_family(path: str) -> dict[str, float]:
    """Accuracy (%) per task family from a held-out eval JSONL, plus the average over families."""
    by = collections.defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by[r["subject"]].append(bool(r["correct"]))
    out = {fam: 100.0 * sum(v) / len(v) for fam, v in sorted(by.items())}
    out["Average"] = sum(out.values()) / len(out)
    return out


def _verification_rate(path: str) -> float:
    """Share (%) of reasoning-agent answers that contain a verification phrase."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts += [m["content"] for m in r["messages"] if m["role"] in ("reasoning", "single")]
    return 100.0 * sum(bool(VERIFY_PHRASES.search(t)) for t in texts) / max(len(texts), 1)


def _plot(histories: dict[str, list[dict]], key_for, ylabel: str, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in histories.items():
        pts = [(r["step"], key_for(r)) for r in records if key_for(r) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from rema_jax.eval.table import markdown_table
    from rema_jax.training.config import load_train_config
    from rema_jax.training.metrics import read_jsonl
    from rema_jax.training.trainer import train

    os.makedirs(FLAGS.workdir, exist_ok=True)
    t0 = time.perf_counter()
    runs = _run_configs()
    summaries, histories, columns = {}, {}, {}
    for name, raw in runs.items():
        config = load_train_config(raw)
        workdir = os.path.join(FLAGS.workdir, name)
        print(f"\n=== {name}: {config.rollout.mode}, {config.loop.steps} steps ===", flush=True)
        summaries[name] = train(config, workdir)
        histories[name] = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        final = os.path.join(workdir, "eval", f"step_{config.loop.steps}.jsonl")
        start = os.path.join(workdir, "eval", "step_0.jsonl")
        if name == "VRP_RL":
            columns["VRP"] = _per_family(start)
        elif name == "ReMA":
            columns["ReMA (step 0)"] = _per_family(start)
        columns[name] = _per_family(final)
        summaries[name]["verification_rate_final"] = _verification_rate(final)
        summaries[name]["verification_rate_start"] = _verification_rate(start)

    order = [c for c in ("VRP", "VRP_RL", "ReMA (step 0)", "ReMA", "ReMA_consistency") if c in columns]
    families = [f for f in columns["VRP"] if f != "Average"]
    scores = {col: {fam: columns[col][fam] for fam in families} for col in order}
    table = markdown_table(scores, columns=order, benchmarks=families, average=True, row_header="Task family")

    _plot(histories,
          lambda r: next((r.get(k) for k in ("single/reward_mean", "reasoning/reward_mean") if r.get(k) is not None), None),
          "low-level agent reward (mean)", os.path.join(FLAGS.workdir, "reward.png"),
          "Training reward (single agent for VRP_RL, reasoning agent for ReMA)")
    _plot(histories, lambda r: None if r.get("eval/accuracy") is None else 100 * r["eval/accuracy"],
          "held-out greedy accuracy (%)", os.path.join(FLAGS.workdir, "heldout_accuracy.png"),
          "Held-out accuracy (built-in tasks)")

    wall = (time.perf_counter() - t0) / 60
    lines = [
        "# ReMA vs VRP_RL on the built-in tasks (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `python launch/experiment.py --workdir={FLAGS.workdir}"
        + (f" --steps={FLAGS.steps}" if FLAGS.steps else "") + (" --ablation" if FLAGS.ablation else "")
        + f" --eval_questions={FLAGS.eval_questions}`. Wall time {wall:.1f} min.",
        "",
        f"Held-out greedy accuracy (%) on {FLAGS.eval_questions} questions; deltas against VRP (no training).",
        "",
        table,
        "",
        "| run | steps | low-level reward first → last | train accuracy first → last | verification phrases start → end (%) |",
        "|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        role = "single" if name == "VRP_RL" else "reasoning"
        lines.append(f"| {name} | {s['steps']} | {s.get(f'{role}/reward_first', float('nan')):+.3f} → "
                     f"{s.get(f'{role}/reward_last', float('nan')):+.3f} | "
                     f"{s.get('train_accuracy_first', float('nan')):.3f} → {s.get('train_accuracy_last', float('nan')):.3f} | "
                     f"{s['verification_rate_start']:.1f} → {s['verification_rate_final']:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(FLAGS.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(FLAGS.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"columns": columns, "summaries": summaries, "wall_min": wall}, f, indent=2)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    app.run(main)
