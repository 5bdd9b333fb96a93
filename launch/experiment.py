"""The CPU learning experiment: ReMA vs a single-agent RL baseline, in the paper's Table 1 layout.

    python launch/experiment.py --workdir=runs/experiment            # SFT then RL (about 1 hour)
    python launch/experiment.py --workdir=runs/experiment --nosft    # RL from the base model

With ``--sft`` (the default), the paper's bootstrap first: each side is fine-tuned on the same
built-in worked examples (configs/sft_default.py: MTA plans + RA solutions; configs/sft_vrp.py: the
same solutions for the single agent), then RL starts from those adapters (configs/rema_from_sft.py,
configs/vrp_rl_from_sft.py). SmolLM2-135M never writes ``\\boxed{}`` unprompted, so from the base
model almost every reward is the format penalty and groups have zero variance.

Runs, with the same seeds, data split and held-out questions:
  1. VRP_RL: one agent (chain of thought), RL with the paper's shaped reward;
  2. ReMA: single-turn meta-thinking + reasoning agents, alternating updates;
  3. (``--ablation``) ReMA with the consistency reward for the meta-thinking agent.
The untrained model is evaluated once (VRP = no training), and each RL run greedily on the held-out
split at its start (= after SFT), every ``--eval_every`` steps and at the end. Writes ``results.md``
(Table 1 layout: rows = task families + average, columns = VRP, [VRP+SFT], VRP_RL, [ReMA+SFT], ReMA,
deltas against VRP), ``results.json``, ``reward.png`` and ``heldout_accuracy.png``.

Presets: ``--preset=powered`` runs the powered experiment of configs/experiment_powered.py instead
(rema_jax/experiments/powered/): SFT_VRP and SFT_ReMA once, then {VRP_RL, ReMA, ReMA_consistency} × 3
RL seeds on 120 held-out questions, then the report with 95% bootstrap CIs over seeds and questions,
the paired difference ReMA − VRP_RL, the Table-1 layout per family and the mechanism table (the RA's
held-out success given the MTA's plans at the start vs the end of each MTA phase):

    python launch/experiment.py --preset=powered --workdir=runs/powered --plan    # stages, time estimate
    python launch/experiment.py --preset=powered --workdir=runs/powered           # ~146 min on 2 cores

Every stage is recorded in ``<workdir>/stages.json`` when it finishes; re-running the command skips
finished stages and continues an RL run from its checkpoints. ``--seeds``, ``--steps``,
``--eval_questions``, ``--phase_steps``, ``--time_budget_min``, ``--base_eval``, ``--override`` (every RL
run) and ``--sft_override`` (both SFT stages) change the preset; results go to ``--results_dir``
(default docs/results): ``powered_experiment.md``, ``powered_experiment.json``,
``powered_accuracy.png``, ``powered_mechanism.png``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from rema_jax.cli import apply_overrides, run_main

flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_integer("steps", None, "RL steps per run (default: the configs').")
flags.DEFINE_integer("eval_questions", 32, "Held-out questions (stratified over family × level).")
flags.DEFINE_integer("eval_every", 4, "Held-out evaluation every k steps.")
flags.DEFINE_bool("ablation", False, "Also run the consistency-reward ablation (one more run).")
flags.DEFINE_bool("sft", True, "Warm-start both sides with SFT on the built-in worked examples first.")
flags.DEFINE_multi_string(
    "sft_override",
    [],
    "Extra overrides for both SFT stages, e.g. loop.epochs=1 "
    "(parsed by the field's type, like --config.x.y=value of launch/sft.py).",
)
flags.DEFINE_multi_string(
    "override",
    [],
    "Extra config overrides for every run, e.g. loop.seed=1 or "
    "adapter.kind=full (parsed like --config.x.y=value of launch/train.py).",
)
flags.DEFINE_enum("preset", None, ["powered"], "Run a preset experiment instead (configs/experiment_<preset>.py).")
flags.DEFINE_integer("seeds", None, "--preset=powered: RL seeds per method (0..n-1).")
flags.DEFINE_integer("phase_steps", None, "--preset=powered: steps per RA phase and per MTA phase of ReMA.")
flags.DEFINE_float(
    "time_budget_min",
    None,
    "--preset=powered: do not start a seed group that would end past this many minutes of stage time (0: no budget).",
)
flags.DEFINE_bool("base_eval", None, "--preset=powered: also evaluate the untrained model (the VRP column).")
flags.DEFINE_string("results_dir", None, "--preset=powered: where the report goes (default: docs/results).")
flags.DEFINE_bool("plan", False, "--preset=powered: print the stages and the time estimate, run nothing.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

VERIFY_PHRASES = re.compile(
    r"(let'?s (verify|check|double[- ]check)|to (verify|check)|verif(y|ication)|double[- ]check|"
    r"check (the|our|this) (answer|solution|result)|go through the solution)",
    re.IGNORECASE,
)


def _sft_configs():
    """{name: (SFT config, the RL run it warm-starts)}; evaluation is left to the RL runs."""
    from configs import sft_default, sft_vrp

    out = {"SFT_VRP": (sft_vrp.get_config(), "VRP_RL"), "SFT_ReMA": (sft_default.get_config(), "ReMA")}
    for c, _ in out.values():
        c.eval.questions = 0
        apply_overrides(c, FLAGS.sft_override, "sft_override")
    return out


def _run_configs():
    if FLAGS.sft:
        from configs import rema_from_sft as rema_cfg
        from configs import vrp_rl_from_sft as vrp_cfg
    else:
        from configs import rl_from_base as rema_cfg
        from configs import vrp_rl_default as vrp_cfg
    runs = {"VRP_RL": vrp_cfg.get_config(), "ReMA": rema_cfg.get_config()}
    if FLAGS.ablation:
        c = rema_cfg.get_config()
        c.reward = dict(kind="consistency")
        runs["ReMA_consistency"] = c
    for c in runs.values():
        c.loop.eval_questions = FLAGS.eval_questions
        c.loop.eval_every = FLAGS.eval_every
        c.loop.eval_before = True
        if FLAGS.steps:
            c.loop.steps = FLAGS.steps
        apply_overrides(c, FLAGS.override)
    return runs


def _per_family(path: str) -> dict[str, float]:
    """Accuracy (%) per task family from a held-out eval JSONL, plus the average over families."""
    from rema_jax.experiments.heldout import heldout_scores

    out = {fam: 100.0 * acc for fam, acc in heldout_scores(path)["by_family"].items()}
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


def _powered_main():
    """``--preset=powered``: configs/experiment_powered.py with the flags applied, via
    rema_jax.training.powered (resumable stages, then the report)."""
    from configs import experiment_powered
    from rema_jax.config_utils import ConfigError
    from rema_jax.experiments import powered

    for name in ("eval_every", "ablation", "sft"):
        if FLAGS[name].present:
            raise ConfigError(
                f"--{name} does not apply to --preset=powered (the preset always warm-starts with "
                "SFT, runs the consistency ablation and evaluates at the phase boundaries)"
            )
    raw = experiment_powered.get_config()
    if FLAGS.seeds is not None:
        raw.seeds = FLAGS.seeds
    if FLAGS["eval_questions"].present:
        raw.heldout_questions = FLAGS.eval_questions
    if FLAGS.time_budget_min is not None:
        raw.time_budget_min = FLAGS.time_budget_min
    if FLAGS.base_eval is not None:
        raw.base_eval = FLAGS.base_eval
    for rl in raw.rl.values():
        if FLAGS.steps:
            rl.loop.steps = FLAGS.steps
        if FLAGS.phase_steps and rl.rollout.mode not in ("vrp", "mrp"):
            rl.schedule.reasoning_steps = rl.schedule.meta_thinking_steps = FLAGS.phase_steps
        apply_overrides(rl, FLAGS.override)
    for sft in raw.sft.values():
        apply_overrides(sft, FLAGS.sft_override, "sft_override")
    cfg = powered.load_powered_config(raw)  # every stage's config checked before any model is loaded
    if FLAGS.plan:
        from rema_jax.experiments.records import read_json

        print(powered.format_plan(cfg, read_json(os.path.join(FLAGS.workdir, powered.STAGES_FILE))))
        return
    results_dir = FLAGS.results_dir or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results"
    )
    out = powered.run_powered(cfg, FLAGS.workdir, results_dir)
    print(f"\nresults: {out['files']['md']}", flush=True)


def main(argv):
    del argv
    if FLAGS.preset == "powered":
        return _powered_main()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from rema_jax.config_utils import ConfigError
    from rema_jax.eval.table import markdown_table
    from rema_jax.sft.train import load_sft_config
    from rema_jax.training.config import load_train_config
    from rema_jax.training.loop import train
    from rema_jax.training.metrics import read_jsonl

    t0 = time.perf_counter()
    runs = _run_configs()
    sft_configs = _sft_configs() if FLAGS.sft else {}
    checks = [(n, load_train_config, raw) for n, raw in runs.items()]
    checks += [(n, load_sft_config, raw) for n, (raw, _) in sft_configs.items()]
    for name, load, raw in checks:  # every stage's config is checked before any model is loaded
        try:
            load(raw)
        except ConfigError as e:
            raise ConfigError(f"run {name}: {e}") from None
    os.makedirs(FLAGS.workdir, exist_ok=True)
    summaries, histories, columns, sft_summaries = {}, {}, {}, {}
    if FLAGS.sft:
        from rema_jax.sft.train import run_sft
        from rema_jax.training.trainer import Trainer, heldout_subset

        # VRP (no training): the untouched model under the VRP prompt, on the RL runs' held-out set.
        print("\n=== VRP: the untrained model ===", flush=True)
        base_cfg = load_train_config(runs["VRP_RL"])
        trainer = Trainer(base_cfg, os.path.join(FLAGS.workdir, "VRP"))
        trainer.evaluate(heldout_subset(trainer.test_tasks, FLAGS.eval_questions), "step_0")
        columns["VRP"] = _per_family(os.path.join(FLAGS.workdir, "VRP", "eval", "step_0.jsonl"))
        del trainer
        for name, (raw, target) in sft_configs.items():
            print(f"\n=== {name}: SFT warm-start of {target} ===", flush=True)
            run = run_sft(load_sft_config(raw), os.path.join(FLAGS.workdir, name))
            sft_summaries[name] = {k: v for k, v in run.summary.items() if k != "data"}
            targets = [target] + (["ReMA_consistency"] if target == "ReMA" and FLAGS.ablation else [])
            for t in targets:
                runs[t].model.init_adapters_from = run.summary["adapters"]
            del run
    for name, raw in runs.items():
        config = load_train_config(raw)
        workdir = os.path.join(FLAGS.workdir, name)
        print(
            f"\n=== {name}: {config.rollout.mode}, {config.loop.steps} steps"
            f"{' from ' + config.model.init_adapters_from if config.model.init_adapters_from else ''} ===",
            flush=True,
        )
        summaries[name] = train(config, workdir)
        histories[name] = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        final = os.path.join(workdir, "eval", f"step_{config.loop.steps}.jsonl")
        start = os.path.join(workdir, "eval", "step_0.jsonl")
        if name == "VRP_RL":
            columns["VRP+SFT" if FLAGS.sft else "VRP"] = _per_family(start)
        elif name == "ReMA":
            columns["ReMA+SFT" if FLAGS.sft else "ReMA (step 0)"] = _per_family(start)
        columns[name] = _per_family(final)
        summaries[name]["verification_rate_final"] = _verification_rate(final)
        summaries[name]["verification_rate_start"] = _verification_rate(start)

    order = [
        c for c in ("VRP", "VRP+SFT", "VRP_RL", "ReMA (step 0)", "ReMA+SFT", "ReMA", "ReMA_consistency") if c in columns
    ]
    families = [f for f in columns["VRP"] if f != "Average"]
    scores = {col: {fam: columns[col][fam] for fam in families} for col in order}
    table = markdown_table(scores, columns=order, benchmarks=families, average=True, row_header="Task family")

    _plot(
        histories,
        lambda r: next(
            (r.get(k) for k in ("single/reward_mean", "reasoning/reward_mean") if r.get(k) is not None), None
        ),
        "low-level agent reward (mean)",
        os.path.join(FLAGS.workdir, "reward.png"),
        "Training reward (single agent for VRP_RL, reasoning agent for ReMA)",
    )
    _plot(
        histories,
        lambda r: None if r.get("eval/accuracy") is None else 100 * r["eval/accuracy"],
        "held-out greedy accuracy (%)",
        os.path.join(FLAGS.workdir, "heldout_accuracy.png"),
        "Held-out accuracy (built-in tasks)",
    )

    wall = (time.perf_counter() - t0) / 60
    lines = [
        "# ReMA vs VRP_RL on the built-in tasks (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `python launch/experiment.py --workdir={FLAGS.workdir}"
        + (f" --steps={FLAGS.steps}" if FLAGS.steps else "")
        + (" --ablation" if FLAGS.ablation else "")
        + ("" if FLAGS.sft else " --nosft")
        + f" --eval_questions={FLAGS.eval_questions}"
        + "".join(f" --override={o}" for o in FLAGS.override)
        + "".join(f" --sft_override={o}" for o in FLAGS.sft_override)
        + f"`. Wall time {wall:.1f} min.",
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
        lines.append(
            f"| {name} | {s['steps']} | {s.get(f'{role}/reward_first', float('nan')):+.3f} → "
            f"{s.get(f'{role}/reward_last', float('nan')):+.3f} | "
            f"{s.get('train_accuracy_first', float('nan')):.3f} → {s.get('train_accuracy_last', float('nan')):.3f} | "
            f"{s['verification_rate_start']:.1f} → {s['verification_rate_final']:.1f} |"
        )
    if sft_summaries:
        lines += ["", "| SFT stage | steps per agent | loss first → last | wall (min) |", "|---|---|---|---|"]
        for name, s in sft_summaries.items():
            agents = s["steps_per_agent"]
            losses = ", ".join(f"{a} {s[f'{a}/loss_first']:.2f} → {s[f'{a}/loss_last']:.2f}" for a in agents)
            lines.append(
                f"| {name} | {', '.join(f'{a} {n}' for a, n in agents.items())} | {losses} | {s['wall_s'] / 60:.1f} |"
            )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(FLAGS.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(FLAGS.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"columns": columns, "summaries": summaries, "sft": sft_summaries, "wall_min": wall},
            f,
            indent=2,
            default=str,
        )
    print("\n" + text, flush=True)


if __name__ == "__main__":
    run_main(main)
