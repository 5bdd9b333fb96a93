"""The three stage bodies: SFT, a greedy held-out evaluation, an RL run. The runner looks them up as
attributes of this module at call time, so tests replace them with stand-ins."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from rema_jax.experiments.heldout import heldout_scores
from rema_jax.experiments.records import rl_diagnostics
from rema_jax.sft.train import SFTConfig
from rema_jax.training.config import TrainConfig


def stage_sft(config: SFTConfig, workdir: str, progress: bool) -> dict[str, Any]:
    """SFT on the built-in worked examples (no eval: the SFT eval stage does it): adapters, steps, losses."""
    from rema_jax.sft.train import run_sft

    sft = dataclasses.replace(config, eval=dataclasses.replace(config.eval, questions=0))
    run = run_sft(sft, workdir, progress=progress)
    s = run.summary
    return {
        "adapters": s["adapters"],
        "steps_per_agent": s["steps_per_agent"],
        "agent_steps": int(sum(s["steps_per_agent"].values())),
        **{k: v for k, v in s.items() if k.endswith(("/loss_first", "/loss_last"))},
    }


def stage_eval(config: TrainConfig, workdir: str, questions: int, tag: str) -> dict[str, Any]:
    """Greedy held-out evaluation of ``questions`` questions → ``eval/<tag>.jsonl`` and its scores."""
    from rema_jax.training.trainer import Trainer, heldout_subset

    trainer = Trainer(config, workdir)
    try:
        trainer.evaluate(heldout_subset(trainer.test_tasks, questions), tag)
    finally:
        trainer.checkpoints.close()
    path = os.path.join(workdir, "eval", f"{tag}.jsonl")
    return {"eval_file": path, **heldout_scores(path)}


def stage_rl(config: TrainConfig, workdir: str, progress: bool) -> dict[str, Any]:
    """One RL run (resuming from its own checkpoints): steps, RL diagnostics, median step time."""
    from rema_jax.training import loop as loop_lib
    from rema_jax.training.metrics import read_jsonl

    summary = loop_lib.train(config, workdir, progress=progress)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    step_s = [r["time/step_s"] for r in records if r.get("time/step_s") is not None]
    return {
        "steps": summary["steps"],
        "resumed_from_step": summary.get("resumed_from_step"),
        "diagnostics": rl_diagnostics(records),
        "step_s_median": float(np.median(step_s)) if step_s else None,
    }
