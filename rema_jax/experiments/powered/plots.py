"""The report's two plots: accuracy with 95% CIs and paired differences (``powered_accuracy.png``), and
held-out accuracy over RL steps with the MTA phases shaded (``powered_mechanism.png``)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from rema_jax.experiments.powered.stages import sft_label
from rema_jax.rollout import META_THINKING


def plot_accuracy(out: Mapping[str, Any], path: str) -> None:
    """Bars: each SFT start and its methods (95% CI, dots = runs); right: the paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names, est, lo, hi, colors = [], [], [], [], []

    def bar(name: str, ci: Mapping[str, float], color: str) -> None:
        names.append(name)
        est.append(ci["estimate"])
        lo.append(ci["low"])
        hi.append(ci["high"])
        colors.append(color)

    if out.get("base"):
        bar("VRP", out["base"]["accuracy"], "#999999")
    for label, s in out["sft_starts"].items():
        bar(label, s["accuracy"], "#8fa8c8")
        for m, r in out["methods"].items():
            if label == sft_label(r["sft"]):
                bar(m, r["final"], "#dd8452")
    x = np.arange(len(names))
    ax.bar(x, est, color=colors, yerr=[np.array(est) - lo, np.array(hi) - est], capsize=4)
    for r in out["runs"]:
        ax.plot(names.index(r["method"]), r["accuracy"], "k.", ms=6, alpha=0.7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(
        ylabel="held-out accuracy (%)",
        ylim=(0, 100),
        title=f"{out['heldout_questions']} questions, seeds {out['seeds']} (dots: runs; bars: 95% CI)",
    )
    ax.grid(axis="y", alpha=0.3)
    labels = [f"{c['a']} − {c['b']}" for c in out["comparisons"]]
    labels += [f"{m} − start" for m in out["methods"]]
    ds = [c["difference"] for c in out["comparisons"]] + [r["rl_minus_start"] for r in out["methods"].values()]
    y = np.arange(len(ds))[::-1]
    ax2.errorbar(
        [d["estimate"] for d in ds],
        y,
        xerr=[[d["estimate"] - d["low"] for d in ds], [d["high"] - d["estimate"] for d in ds]],
        fmt="o",
        capsize=4,
    )
    ax2.axvline(0, color="k", lw=0.8, ls="--")
    ax2.set_yticks(y, labels)
    ax2.set(xlabel="paired difference (points)", title="paired differences, 95% CI")
    ax2.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mechanism(out: Mapping[str, Any], path: str) -> None:
    """Per two-agent method: held-out accuracy at each phase boundary (seeds and mean with CI), MTA
    phases shaded with their end − start difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech = out["mechanism"]
    n = max(len(mech), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (m, d) in zip(axes[0], mech.items()):
        phases = d["phases"]
        for p in phases:
            if p["trained"] == META_THINKING:
                ax.axvspan(p["start"], p["end"], color="#dd8452", alpha=0.15)
                dl = p["delta"]
                ax.text(
                    (p["start"] + p["end"]) / 2,
                    0.03,
                    f"Δ {dl['estimate']:+.1f}\n[{dl['low']:+.1f}, {dl['high']:+.1f}]",
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        seeds = [x["seed"] for x in phases[0]["per_seed"]] if phases else []
        for i, s in enumerate(seeds):
            xs = [phases[0]["start"]] + [p["end"] for p in phases]
            ys = [phases[0]["per_seed"][i]["start"]] + [p["per_seed"][i]["end"] for p in phases]
            ax.plot(xs, ys, color="0.6", lw=1, marker=".", label="seeds" if i == 0 else None)
        if phases:
            pts = [(phases[0]["start"], phases[0]["start_mean"])] + [(p["end"], p["end_mean"]) for p in phases]
            ax.errorbar(
                [p[0] for p in pts],
                [p[1]["estimate"] for p in pts],
                yerr=[[p[1]["estimate"] - p[1]["low"] for p in pts], [p[1]["high"] - p[1]["estimate"] for p in pts]],
                color="C0",
                marker="o",
                capsize=4,
                lw=2,
                label="mean, 95% CI",
            )
        ax.set(title=f"{m}: shaded = MTA phases (RA frozen)", xlabel="RL step", ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not mech:
        axes[0][0].text(0.5, 0.5, "no two-agent method", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
