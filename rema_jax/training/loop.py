"""The training loop: ``train(config, workdir)`` steps a ``Trainer`` to ``loop.steps`` with held-out
evaluations, metrics (JSONL + TensorBoard), checkpoints, curves and a summary."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from rema_jax import sharding
from rema_jax.config_utils import to_dict
from rema_jax.training.config import TrainConfig
from rema_jax.training.metrics import MetricsLogger
from rema_jax.training.plots import plot_training_curves
from rema_jax.training.task_data import heldout_subset
from rema_jax.training.trainer import RewardOverride, Trainer


def _eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Harness summary (percentages) → logged fractions."""
    out = {"eval/accuracy": summary["score"] / 100.0}
    if "boxed_rate" in summary:  # math
        out["eval/boxed_rate"] = summary["boxed_rate"] / 100.0
    if "no_verdict_rate" in summary:  # judge
        out["eval/no_verdict_rate"] = summary["no_verdict_rate"] / 100.0
    if summary.get("peak_rss_mib") is not None:
        out["memory/eval_peak_rss_mib"] = summary["peak_rss_mib"]
    return out


def _format_summary(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def train(
    config: TrainConfig,
    workdir: str,
    *,
    resume: bool = True,
    reward_override: RewardOverride | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train for ``config.loop.steps`` (or stop after ``max_steps`` more, for tests); returns a summary.

    Writes ``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``eval/``, ``curves.png``,
    ``config.json`` and ``summary.json`` under ``workdir``.
    """
    from tqdm import tqdm

    t_run = time.perf_counter()
    trainer = Trainer(config, workdir, reward_override=reward_override)
    resumed = resume and trainer.restore()
    is_main = sharding.is_main_process()
    if is_main:
        with open(os.path.join(trainer.workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_dict(config), f, indent=2, default=str)
    logger = MetricsLogger(trainer.workdir, resume_from_step=trainer.step_index if resumed else 0)
    if is_main and not resumed and os.path.exists(logger.path):
        open(logger.path, "w").close()

    cfg = config.loop
    eval_tasks = heldout_subset(trainer.test_tasks, cfg.eval_questions)
    summary: dict[str, Any] = {"resumed_from_step": trainer.step_index if resumed else None}
    if eval_tasks and cfg.eval_before and not resumed:
        ev = trainer.evaluate(eval_tasks, "step_0")
        summary["eval_before"] = ev["score"] / 100.0
        logger.write(0, _eval_metrics(ev))

    end = cfg.steps if max_steps is None else min(cfg.steps, trainer.step_index + max_steps)
    bar = tqdm(
        total=cfg.steps,
        initial=trainer.step_index,
        desc="ReMA RL",
        unit="step",
        disable=not (progress and is_main),
        dynamic_ncols=True,
    )
    history = []
    try:
        while trainer.step_index < end:
            metrics = trainer.step()
            step = trainer.step_index
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and eval_tasks:
                metrics.update(_eval_metrics(trainer.evaluate(eval_tasks, f"step_{step}")))
            if step == cfg.steps and eval_tasks:
                trainer.release_programs(final=True)  # no update follows: their host memory goes to the eval
                metrics.update(_eval_metrics(trainer.evaluate(eval_tasks, f"step_{step}")))
            record = logger.write(step, metrics)
            history.append(record)
            if step % config.checkpoint.every == 0 or step == end:
                trainer.save()
            rewards = {r: metrics.get(f"{r}/reward_mean") for r in trainer.roles}
            bar.set_postfix(
                {
                    **{f"R_{r[:4]}": f"{v:+.2f}" for r, v in rewards.items() if v is not None},
                    "acc": f"{metrics['train/accuracy']:.2f}",
                    "s/step": f"{metrics['time/step_s']:.1f}",
                    "train": metrics["phase/trained"][:4],
                }
            )
            bar.update(1)
    finally:
        bar.close()
        logger.close()
        trainer.checkpoints.close()

    if is_main:
        plot = plot_training_curves(
            logger.path,
            os.path.join(trainer.workdir, "curves.png"),
            title=f"ReMA {config.rollout.mode} · {config.model.source}",
        )
        summary["plot"] = plot
    summary.update({"steps": trainer.step_index, "wall_s": time.perf_counter() - t_run})
    if history:
        first, last = history[0], history[-1]
        for r in trainer.roles:
            summary[f"{r}/reward_first"] = first.get(f"{r}/reward_mean")
            summary[f"{r}/reward_last"] = last.get(f"{r}/reward_mean")
        summary["train_accuracy_first"] = first.get("train/accuracy")
        summary["train_accuracy_last"] = last.get("train/accuracy")
        if "eval/accuracy" in last:
            summary["eval_after"] = last["eval/accuracy"]
    if is_main:
        with open(os.path.join(trainer.workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        rows = [
            ("workdir", trainer.workdir),
            ("steps", str(trainer.step_index)),
            ("wall time", f"{summary['wall_s'] / 60:.1f} min"),
        ]
        for r in trainer.roles:
            if f"{r}/reward_first" in summary:
                rows.append(
                    (f"{r} reward", f"{summary[f'{r}/reward_first']:+.3f} → {summary[f'{r}/reward_last']:+.3f}")
                )
        if "train_accuracy_first" in summary:
            rows.append(
                ("train accuracy", f"{summary['train_accuracy_first']:.3f} → {summary['train_accuracy_last']:.3f}")
            )
        if "eval_before" in summary or "eval_after" in summary:
            rows.append(
                (
                    "held-out accuracy",
                    f"{summary.get('eval_before', float('nan')):.3f} → {summary.get('eval_after', float('nan')):.3f}",
                )
            )
        if summary.get("plot"):
            rows.append(("curves", summary["plot"]))
        print("\nReMA training summary\n" + _format_summary(rows), flush=True)
    return summary
