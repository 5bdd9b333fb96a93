"""The paper's bootstrap as one job: held-out eval of the base model → SFT warm start of both
agents → held-out eval → ReMA RL from the SFT adapters → held-out eval.

Stages (each under ``workdir``, each resumable; a finished stage is never redone):

  ``base``  greedy held-out accuracy of the untrained model (the RL config's protocol, adapters at
            their zero init, so the policy *is* the base model)  → ``base/eval/base.jsonl``;
  ``sft``   ``sft.train.run_sft`` on the built-in worked examples → ``sft/adapters/<agent>``;
  ``rl``    ``trainer.train`` with ``model.init_adapters_from = sft/adapters``; its step-0 eval is
            the "after SFT" point and its final eval the "after RL" point → ``rl/eval/step_*.jsonl``.

The three evaluations use the same ``heldout_questions`` questions (``heldout_subset``: round-robin
over (family, level) cells of the RL data split, which SFT shares, so SFT never sees them).
``stages.json`` records each finished stage (written atomically); ``summary.json`` holds
``heldout_accuracy = {"base", "sft", "rl"}`` (fractions), per-family accuracy, seconds per stage,
and the RL diagnostics a person checks first (zero-variance groups, MTA gradient norms);
``bootstrap.png`` plots reward per agent, held-out accuracy at the three points and the share of
zero-variance groups.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

from rema_jax.config_utils import from_dict, to_dict
from rema_jax.errors import UserError
from rema_jax.experiments.heldout import heldout_scores
from rema_jax.experiments.records import StageError, read_json, rl_diagnostics, write_json
from rema_jax.host_memory import PeakRss, release_memory
from rema_jax.sft.train import SFTConfig
from rema_jax.training.config import TrainConfig

STAGES = ("base", "sft", "rl")


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """``sft`` warm-starts the agents ``rl`` trains; ``heldout_questions`` are evaluated at the
    three points. The two stages must describe the same model, adapters and data split."""

    sft: SFTConfig
    rl: TrainConfig
    heldout_questions: int = 48

    def __post_init__(self):
        s, r = self.sft, self.rl
        if self.heldout_questions < 1:
            raise ValueError(f"heldout_questions must be >= 1, got {self.heldout_questions}")
        if r.model.init_adapters_from is not None:
            raise ValueError(
                "rl.model.init_adapters_from: leave unset; the bootstrap starts RL from its own SFT stage's adapters"
            )
        for name in ("source", "dtype", "param_dtype", "random_init"):
            if getattr(s.model, name) != getattr(r.model, name):
                raise ValueError(
                    f"sft.model.{name}={getattr(s.model, name)!r} differs from "
                    f"rl.model.{name}={getattr(r.model, name)!r}: both stages must train one model"
                )
        if s.adapter != r.adapter:
            raise ValueError(
                f"sft.adapter {s.adapter} differs from rl.adapter {r.adapter}: RL loads the "
                "SFT adapters, so kind, rank, alpha and targets must match"
            )
        if r.data.source != "builtin" or not s.data.builtin:
            raise ValueError(
                "the bootstrap runs on the built-in tasks (sft.data.builtin=True, "
                "rl.data.source='builtin'); chain launch/sft.py and launch/train.py for files"
            )
        for name in ("families", "levels", "train_per_cell", "test_per_cell", "split_seed"):
            if tuple(_as_tuple(getattr(s.data, name))) != tuple(_as_tuple(getattr(r.data, name))):
                raise ValueError(
                    f"sft.data.{name}={getattr(s.data, name)!r} differs from rl.data.{name}="
                    f"{getattr(r.data, name)!r}: SFT must use RL's split so it never trains "
                    "on the held-out questions"
                )
        if s.data.mode == "vrp" and not r.single_agent:
            raise ValueError("sft.data.mode='vrp' warm-starts the single agent, but rl trains ReMA's two agents")
        agents = ("shared",) if r.adapter.kind == "shared" else r.rollout.agent_roles
        if r.adapter.kind != "shared" and set(agents) - set(s.loop.roles):
            raise ValueError(f"sft.loop.roles={tuple(s.loop.roles)} does not train every RL agent {agents}")
        n_test = r.data.test_per_cell * len(r.data.families) * len(r.data.levels)
        if self.heldout_questions > n_test:
            raise ValueError(
                f"heldout_questions={self.heldout_questions} but the split holds {n_test} "
                "held-out questions (data.test_per_cell × families × levels)"
            )


def _as_tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def is_bootstrap_config(raw: Any) -> bool:
    """True for a config with ``sft`` and ``rl`` sections (``configs/default.py``)."""
    keys = set(raw.keys()) if hasattr(raw, "keys") else set()
    return {"sft", "rl"} <= keys


def load_bootstrap_config(raw: Any) -> BootstrapConfig:
    """``ml_collections.ConfigDict`` / dict → validated ``BootstrapConfig`` (raises ``ConfigError``
    naming the dotted path, e.g. ``config.rl.loop.steps``)."""
    return from_dict(BootstrapConfig, raw, "config")  # nested: errors name e.g. config.rl.loop


# ----------------------------------------------------------------------------------- stages
def rl_config_from_sft(config: BootstrapConfig, adapters: str) -> TrainConfig:
    """The RL stage's config: start from ``adapters``, evaluate the held-out questions at step 0."""
    rl = config.rl
    return dataclasses.replace(
        rl,
        model=dataclasses.replace(rl.model, init_adapters_from=adapters),
        loop=dataclasses.replace(rl.loop, eval_before=True, eval_questions=config.heldout_questions),
    )


def _stage_base(config: BootstrapConfig, workdir: str) -> dict[str, Any]:
    from rema_jax.training.trainer import Trainer, heldout_subset

    trainer = Trainer(config.rl, workdir)  # fresh adapters: LoRA B = 0, i.e. the base
    trainer.evaluate(heldout_subset(trainer.test_tasks, config.heldout_questions), "base")
    trainer.checkpoints.close()
    return heldout_scores(os.path.join(workdir, "eval", "base.jsonl"))


def _stage_sft(config: BootstrapConfig, workdir: str, progress: bool) -> dict[str, Any]:
    from rema_jax.sft.train import run_sft

    sft = dataclasses.replace(config.sft, eval=dataclasses.replace(config.sft.eval, questions=0))
    run = run_sft(sft, workdir, progress=progress)
    return {
        "adapters": run.summary["adapters"],
        "steps_per_agent": run.summary["steps_per_agent"],
        **{k: v for k, v in run.summary.items() if k.endswith(("/loss_first", "/loss_last"))},
    }


def _stage_rl(config: BootstrapConfig, workdir: str, adapters: str, progress: bool) -> dict[str, Any]:
    from rema_jax.training.loop import train
    from rema_jax.training.metrics import read_jsonl

    rl = rl_config_from_sft(config, adapters)
    summary = train(rl, workdir, progress=progress)
    eval_dir = os.path.join(workdir, "eval")
    out = {
        "sft": heldout_scores(os.path.join(eval_dir, "step_0.jsonl")),
        "rl": heldout_scores(os.path.join(eval_dir, f"step_{rl.loop.steps}.jsonl")),
        "steps": summary["steps"],
    }
    out["diagnostics"] = rl_diagnostics(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    return out


def run_bootstrap(config: BootstrapConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the three stages; returns and writes ``summary.json``."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), to_dict(config))
    stages_path = os.path.join(workdir, "stages.json")
    stages = read_json(stages_path)
    dirs = {name: os.path.join(workdir, name) for name in STAGES}

    for name in STAGES:
        if name in stages:
            print(
                f"[bootstrap] stage {name}: done in an earlier run ({stages[name]['seconds']:.0f} s), skipped",
                flush=True,
            )
            continue
        print(f"\n[bootstrap] stage {name} → {dirs[name]}", flush=True)
        t0 = time.perf_counter()
        try:
            with PeakRss() as peak:
                if name == "base":
                    result = _stage_base(config, dirs[name])
                elif name == "sft":
                    result = _stage_sft(config, dirs[name], progress)
                else:
                    result = _stage_rl(config, dirs[name], stages["sft"]["adapters"], progress)
        except (UserError, FileNotFoundError) as e:
            raise StageError(
                f"bootstrap stage {name!r} failed while writing {dirs[name]}: {type(e).__name__}: {e}"
            ) from e
        except Exception as e:
            e.add_note(f"bootstrap stage {name!r} failed while writing {dirs[name]}")
            raise
        result["seconds"] = time.perf_counter() - t0
        result["peak_rss_mib"] = peak.mib
        print(f"[bootstrap] stage {name}: peak RSS {result['peak_rss_mib']} MiB", flush=True)
        release_memory()  # the stage's model, sampler and executables are garbage now: give them back
        stages[name] = result
        write_json(stages_path, stages)

    summary = _summarize(config, stages, workdir)
    write_json(os.path.join(workdir, "summary.json"), summary)
    print("\n" + format_summary(summary), flush=True)
    return summary


def _summarize(config: BootstrapConfig, stages: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    scores = {"base": stages["base"], "sft": stages["rl"]["sft"], "rl": stages["rl"]["rl"]}
    summary = {
        "heldout_accuracy": {k: v["accuracy"] for k, v in scores.items()},
        "heldout_by_family": {k: v["by_family"] for k, v in scores.items()},
        "heldout_questions": scores["base"]["questions"],
        "seconds": {**{k: stages[k]["seconds"] for k in STAGES}, "total": sum(stages[k]["seconds"] for k in STAGES)},
        "peak_rss_mib": {k: stages[k].get("peak_rss_mib") for k in STAGES},  # per stage (host memory)
        "rl_steps": stages["rl"]["steps"],
        "rl_diagnostics": stages["rl"]["diagnostics"],
        "sft": {k: v for k, v in stages["sft"].items() if k != "seconds"},
    }
    summary["plot"] = plot_bootstrap(workdir, summary)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The short console table: held-out accuracy at the three points, then the stage times."""
    acc, secs = summary["heldout_accuracy"], summary["seconds"]
    lines = [f"held-out accuracy ({summary['heldout_questions']} questions, greedy)", "  stage  accuracy  minutes"]
    for k, label in (("base", "base"), ("sft", "sft"), ("rl", "rl")):
        lines.append(f"  {label:<5}  {100 * acc[k]:6.1f}%  {secs[k] / 60:7.1f}")
    lines.append(f"  total            {secs['total'] / 60:7.1f}")
    for role, d in summary["rl_diagnostics"].items():
        if d["frac_zero_variance_groups"] is None:
            continue
        lines.append(
            f"  {role}: reward {d['reward_first']:+.2f} → {d['reward_last']:+.2f}, "
            f"zero-variance groups {100 * d['frac_zero_variance_groups']:.0f}%, "
            f"non-zero grad in {d['nonzero_grad_steps']}/{d['update_steps']} updates"
        )
    if summary.get("plot"):
        lines.append(f"  curves: {summary['plot']}")
    return "\n".join(lines)


def plot_bootstrap(workdir: str, summary: Mapping[str, Any]) -> str | None:
    """``bootstrap.png``: RL reward per agent, held-out accuracy at the three points, and the share
    of zero-variance groups per agent over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rema_jax.training.metrics import read_jsonl

    metrics = os.path.join(workdir, "rl", "metrics.jsonl")
    records = read_jsonl(metrics) if os.path.exists(metrics) else []
    roles = list(summary["rl_diagnostics"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for role in roles:
        pts = [(r["step"], r[f"{role}/reward_mean"]) for r in records if r.get(f"{role}/reward_mean") is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", ms=3, label=role)
        pts = [
            (r["step"], 100 * r[f"{role}/frac_reward_zero_std"])
            for r in records
            if r.get(f"{role}/frac_reward_zero_std") is not None
        ]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", ms=3, label=role)
    axes[0].set(title="RL training reward (mean per step)", xlabel="RL step", ylabel="reward")
    acc = summary["heldout_accuracy"]
    bars = axes[1].bar(
        ["base", "after SFT", "after RL"], [100 * acc[k] for k in STAGES], color=["#999999", "#4c72b0", "#dd8452"]
    )
    axes[1].bar_label(bars, fmt="%.1f%%")
    axes[1].set(title=f"held-out accuracy ({summary['heldout_questions']} questions)", ylabel="%", ylim=(0, 105))
    axes[2].axhline(50, color="k", lw=0.8, ls="--")
    axes[2].set(title="zero-variance reward groups", xlabel="RL step", ylabel="% of groups", ylim=(-3, 103))
    for ax in (axes[0], axes[2]):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(workdir, "bootstrap.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
