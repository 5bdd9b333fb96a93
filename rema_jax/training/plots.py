"""PNG training curves from ``metrics.jsonl``: what a person looks at after a run."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rema_jax.training.metrics import read_jsonl

DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reasoning/reward_mean", "meta_thinking/reward_mean", "shared/reward_mean")),
    ("accuracy", ("train/accuracy", "eval/accuracy")),
    ("response length (tokens)", ("reasoning/response_length", "meta_thinking/response_length")),
    (
        "KL / clip fraction",
        ("reasoning/approx_kl", "meta_thinking/approx_kl", "reasoning/clip_frac", "meta_thinking/clip_frac"),
    ),
    ("grad norm", ("reasoning/grad_norm", "meta_thinking/grad_norm", "shared/grad_norm")),
    ("time per step (s)", ("time/rollout_s", "time/update_s")),
)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    kernel = np.ones(k) / k
    pad = np.concatenate([np.full(k - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def plot_training_curves(
    metrics_path: str,
    out_path: str,
    panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
    title: str | None = None,
) -> str | None:
    """Plot the panels whose keys appear in the log; returns the PNG path (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    present = [(name, [k for k in keys if any(k in r and r[k] is not None for r in records)]) for name, keys in panels]
    present = [(n, ks) for n, ks in present if ks]
    if not present:
        return None
    cols = 2
    rows = (len(present) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, present):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            x = np.array([p[0] for p in pts])
            y = np.array([p[1] for p in pts], dtype=float)
            (line,) = ax.plot(x, y, alpha=0.35, lw=1)
            ax.plot(x, _smooth(y, max(1, len(y) // 10)), color=line.get_color(), lw=2, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
